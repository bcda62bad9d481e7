"""The attention seam between the model and where attention runs.

The model calls `attend(layer, q, k, v)` for every layer; an executor stores the new K, V and
returns the attention output. `LocalAttention` does both on the engine's own device; the pool's
executor (in `actors/`) keeps short sequences local and fans long ones out to pool members.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fapool.attention import AttentionKernel
from fapool.batch import SeqSlice, StepBatch
from fapool.kvcache import KVCache
from fapool.profiling import PhaseTimer


@dataclass(frozen=True)
class DecodePlan:
    """Arena coordinates of a decode batch: the row each new token goes to, and each sequence's
    region (start, filled length including the new token)."""

    rows: torch.Tensor  # (B,) int64 on the cache's device
    starts: list[int]
    lengths: list[int]
    kernel_plan: object | None = None  # the kernel's varlen metadata, made once per step


class AttentionExecutor(ABC):
    """Owns the KV of running sequences and computes their attention.

    Contract: `allocate` reserves room for a sequence's whole life before its prefill; `begin_step`
    announces the batch whose tokens the following `attend` calls carry (flat, in batch order);
    `end_step` closes it (the new tokens are then cached); `free` releases a finished sequence.
    """

    @abstractmethod
    def max_seq_tokens(self) -> int:
        """The longest sequence (prompt + max_tokens) this executor could ever hold."""

    @abstractmethod
    def can_allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> bool:
        """Whether a sequence of `num_prompt` tokens to prefill, `num_tokens` in all, fits now."""

    @abstractmethod
    def allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> None: ...

    @abstractmethod
    def free(self, seq_id: str) -> None: ...

    @abstractmethod
    def begin_step(self, batch: StepBatch) -> None: ...

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (N, Hq, D), k, v: (N, Hkv, D) for the step's tokens. Returns (N, Hq, D)."""

    def end_step(self) -> None:
        """Called after the last layer; the step's tokens are now cached."""


class LocalAttention(AttentionExecutor):
    """Attention on the engine's device over its own KV cache."""

    def __init__(self, cache: KVCache, kernel: AttentionKernel, timer: PhaseTimer | None = None) -> None:
        self.cache = cache
        self.kernel = kernel
        self.timer = timer or PhaseTimer(cache.device)
        self._batch: StepBatch | None = None
        self._offsets: list[int] = []

    def max_seq_tokens(self) -> int:
        return self.cache.capacity_tokens

    def can_allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> bool:
        return self.cache.can_allocate(num_tokens)

    def allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> None:
        self.cache.allocate(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        self.cache.free(seq_id)

    def begin_step(self, batch: StepBatch) -> None:
        self._batch = batch
        self._offsets = batch.offsets()
        self._decode = self.decode_plan(batch.slices) if batch.kind == "decode" else None

    def decode_plan(self, slices: Sequence[SeqSlice]) -> DecodePlan:
        """Where a decode step's sequences live in the arena: computed once, used by every layer."""
        slabs = [self.cache.get(s.seq_id) for s in slices]
        return self.region_plan([b.start + s.start for b, s in zip(slabs, slices)],
                                [b.start for b in slabs], [s.end for s in slices])

    def region_plan(self, rows: list[int], starts: list[int], lengths: list[int]) -> DecodePlan:
        dev = self.cache.device
        kplan = self.kernel.varlen_plan(starts, lengths, self.cache.cfg.num_key_value_heads, dev) if starts else None
        return DecodePlan(torch.tensor(rows, dtype=torch.long).to(dev), starts, lengths, kplan)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None, "attend() outside begin_step/end_step"
        out = torch.empty_like(q)
        with self.timer.phase("attention"):
            if self._decode is not None:
                n = len(self._batch.slices)
                out[:n] = self.attend_decode(layer, self._decode, q[:n], k[:n], v[:n])[0]
            else:
                for s, lo, hi in zip(self._batch.slices, self._offsets, self._offsets[1:]):
                    out[lo:hi] = self.attend_slice(layer, s, q[lo:hi], k[lo:hi], v[lo:hi])
        return out

    def attend_decode(
        self, layer: int, plan: DecodePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache one new token per sequence and attend each over its region, as one batch."""
        arena = self.cache.arena
        arena[layer, 0].index_copy_(0, plan.rows, k)
        arena[layer, 1].index_copy_(0, plan.rows, v)
        return self.kernel.decode_varlen(q, arena[layer, 0], arena[layer, 1], plan.starts, plan.lengths,
                                         plan=plan.kernel_plan)

    def attend_slice(
        self, layer: int, s: SeqSlice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Cache one sequence's new rows (at their positions) and attend over all its rows so far."""
        slab = self.cache.get(s.seq_id)
        slab.write(layer, s.start, k, v)
        o, _lse = self.kernel.forward(q, slab.keys(layer, s.end), slab.values(layer, s.end), causal=True)
        return o

    def end_step(self) -> None:
        assert self._batch is not None
        for s in self._batch.slices:
            self.cache.get(s.seq_id).length = s.end
        self._batch = None
