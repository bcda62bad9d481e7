"""The attention seam between the model and where attention runs.

The model calls `attend(layer, q, k, v)` for every layer; an executor stores the new K, V and
returns the attention output. `LocalAttention` does both on the engine's own device over its
paged KV cache; the pool's executor (`fapool/pool/`) keeps short sequences local and fans long ones
out to pool members.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from fapool.attention import AttentionKernel
from fapool.attention.paged import PagedPlan
from fapool.step_batch import StepBatch
from fapool.paged_cache import PagedKVCache
from fapool.profiling import PhaseTimer


@dataclass(frozen=True)
class RowsPlan:
    """Rows [start, end) of some sequences, written this step, each sequence then attending over
    its rows [0, end): the arena slot of every new row and the paged kernel's plan."""

    slots: torch.Tensor  # (N,) int64 on the device
    paged: PagedPlan
    decode: bool  # one new row per sequence


class AttentionExecutor(ABC):
    """Owns the KV of running sequences and computes their attention.

    Contract: `allocate` takes room for a sequence's prompt before its prefill and, given its
    tokens, returns the rows of it already cached (prefix caching: the prefill starts there); `grow` takes room
    for more rows before a step that adds them (False: no room now, the scheduler preempts);
    `begin_step` announces the batch whose tokens the following `attend` calls carry (flat, in
    batch order); `end_step` closes it (the new tokens are then cached); `free` releases a
    finished or preempted sequence; `commit` publishes its full, written pages to the prefix cache.
    """

    @abstractmethod
    def max_seq_tokens(self) -> int:
        """The longest sequence (prompt + max_tokens) this executor could ever hold."""

    @abstractmethod
    def can_allocate(self, seq_id: str, num_prompt: int, num_tokens: int, tokens: Seq[int] | None = None) -> bool:
        """Whether a sequence of `num_prompt` tokens to prefill, `num_tokens` at most, can start now
        (with its `tokens`: counting the pages of its cached prefix)."""

    @abstractmethod
    def allocate(self, seq_id: str, num_prompt: int, num_tokens: int, tokens: Seq[int] | None = None) -> int:
        """Room for its prompt; returns the rows already cached (0 without `tokens`)."""

    def commit(self, seq_id: str, tokens: Callable[[int, int], Seq[int]], known: int) -> None:
        """Publish the sequence's full, written pages (`PagedKVCache.commit`)."""

    @abstractmethod
    def grow(self, seq_id: str, num_new: int) -> bool:
        """Room for `num_new` more rows of this sequence; False when the cache has none free."""

    @abstractmethod
    def free(self, seq_id: str) -> None: ...

    def prefill_whole(self, seq_id: str) -> bool:
        """Whether this sequence's prompt must be prefilled in one step (pooled prompts are split
        by query blocks over the members, which needs the whole prompt at once)."""
        return False

    def graph_safe(self, batch: StepBatch) -> bool:
        """Whether a decode step of this batch may run as one captured graph over the local pages."""
        return True

    @abstractmethod
    def begin_step(self, batch: StepBatch) -> None: ...

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (N, Hq, D), k, v: (N, Hkv, D) for the step's tokens. Returns (N, Hq, D)."""

    def end_step(self) -> None:
        """Called after the last layer; the step's tokens are now cached."""

    def kv_usage(self) -> tuple[int, int]:
        """(rows held, rows in all) of the local cache."""
        return 0, 0


class LocalAttention(AttentionExecutor):
    """Attention on the engine's device over its own paged KV cache."""

    def __init__(self, cache: PagedKVCache, kernel: AttentionKernel, timer: PhaseTimer | None = None) -> None:
        self.cache = cache
        self.kernel = kernel
        self.timer = timer or PhaseTimer(cache.device)
        self._batch: StepBatch | None = None
        self._plan: RowsPlan | None = None

    def max_seq_tokens(self) -> int:
        return self.cache.max_pages_per_seq * self.cache.page_size

    def can_allocate(self, seq_id: str, num_prompt: int, num_tokens: int, tokens: Seq[int] | None = None) -> bool:
        return self.cache.can_allocate(num_prompt, seq_id, tokens)

    def allocate(self, seq_id: str, num_prompt: int, num_tokens: int, tokens: Seq[int] | None = None) -> int:
        return self.cache.allocate(seq_id, num_prompt, tokens).length

    def commit(self, seq_id: str, tokens: Callable[[int, int], Seq[int]], known: int) -> None:
        self.cache.commit(seq_id, tokens, known)

    def grow(self, seq_id: str, num_new: int) -> bool:
        return self.cache.grow(seq_id, self.cache.get(seq_id).length + num_new)

    def free(self, seq_id: str) -> None:
        self.cache.free(seq_id)

    def kv_usage(self) -> tuple[int, int]:
        return self.cache.reserved_tokens, self.cache.capacity_tokens

    def rows_plan(self, seq_ids: list[str], starts: list[int], ends: list[int]) -> RowsPlan:
        c = self.cache
        slots = np.concatenate([c.slots(s, a, b) for s, a, b in zip(seq_ids, starts, ends)])
        q_lens = [b - a for a, b in zip(starts, ends)]
        paged = PagedPlan.build(c.page_table(seq_ids), ends, q_lens, c.page_size, c.device)
        return RowsPlan(torch.from_numpy(slots).to(c.device, non_blocking=True), paged,
                        all(n == 1 for n in q_lens))

    def attend_rows(self, layer: int, plan: RowsPlan, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache the new rows k, v and attend q over every sequence's rows so far. Returns the
        output and, at decode, its LSE (Hq, B) for a merge with the pool's partials."""
        self.cache.write(layer, plan.slots, k, v)
        k_pages, v_pages = self.cache.pages_view(layer)
        if plan.decode:
            return self.kernel.decode_paged(q, k_pages, v_pages, plan.paged)
        return self.kernel.prefill_paged(q, k_pages, v_pages, plan.paged), None

    def begin_step(self, batch: StepBatch) -> None:
        self._batch = batch
        self._plan = None  # made at the first attend: a captured decode step never needs it

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None, "attend() outside begin_step/end_step"
        if self._plan is None:
            sl = self._batch.slices
            self._plan = self.rows_plan([s.seq_id for s in sl], [s.start for s in sl], [s.end for s in sl])
        with self.timer.phase("attention"):
            return self.attend_rows(layer, self._plan, q, k, v)[0]

    def end_step(self) -> None:
        assert self._batch is not None
        for s in self._batch.slices:
            self.cache.get(s.seq_id).length = s.end
        self._batch = None
