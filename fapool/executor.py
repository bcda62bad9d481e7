"""The attention seam between the model and where attention runs.

The model calls `attend(layer, q, k, v)` for every layer; an executor stores the new K, V and
returns the attention output. Pages are the scheduler's (`fapool/scheduler.py`): an executor
only writes and reads the rows it is given. `LocalAttention` does both on the engine's own device over its
paged KV cache; the pool's executor (`fapool/pool/`) keeps short sequences local and fans long ones
out to pool members.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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


@dataclass(frozen=True)
class Placement:
    """Where a new sequence's prompt rows go, as its executor plans them: `local_rows` on the
    base's own pages, which must have `room_rows` free now; `shards`, the executor's plan for the
    rest (pool members and their rows), None when every row stays local."""

    local_rows: int
    room_rows: int
    shards: object | None = None


class AttentionExecutor(ABC):
    """Computes the attention of running sequences, over the scheduler's pages and, for a pooled
    executor, shards on other devices.

    The scheduler owns the pages (`PagedKVCache`, the block manager); what else a sequence needs
    to start (its shards on pool members) it asks here: `plan` is a pure check, `place` the act,
    `release` undoes it when the sequence ends or is preempted. `begin_step` announces the batch
    whose tokens the following `attend` calls carry (flat, in batch order); `end_step` closes it
    (the new tokens are then cached).
    """

    @abstractmethod
    def max_seq_tokens(self) -> int:
        """The longest sequence (prompt + max_tokens) this executor could ever hold."""

    def plan(self, seq_id: str, num_prompt: int, waited_s: float, cached_rows: int = 0) -> Placement | None:
        """Where a sequence of `num_prompt` rows would go if it started now, having been held back
        for `waited_s` seconds, its first `cached_rows` found in the prefix cache (a local
        placement's pages would start with them); None: hold it back (a pool is growing for it),
        others may start. Changes nothing."""
        return Placement(num_prompt, num_prompt)

    def place(self, seq_id: str, placement: Placement) -> None:
        """Take what `placement` holds beyond the base's pages (after the scheduler took those)."""

    def release(self, seq_id: str) -> None:
        """Give back what `place` took (the sequence ended or was preempted)."""

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

    def phase_times(self) -> tuple[tuple[str, float], ...]:
        """Seconds per phase of the steps since the last call, with profiling on (else empty)."""
        return ()


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

    def phase_times(self) -> tuple[tuple[str, float], ...]:
        return tuple(sorted(self.timer.collect().items())) if self.timer.enabled else ()

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
