"""KV cache: one arena per device, a contiguous region per sequence, reserved up front.

A sequence reserves room for its whole life (prompt + max_tokens) when it is admitted, so a
running batch can never run out of memory halfway: when the cache is full, new requests wait.
All regions live in one arena tensor (L, 2, rows, Hkv, D), so a decode step can attend over the
KV of every sequence of the batch in one varlen kernel call (region starts and lengths).
The same store holds shards: a pool member keeps only some token rows of a sequence, in any order
(decode attention does not care about row order; RoPE was applied before caching).
"""
from __future__ import annotations

import bisect
import threading

import torch

from fapool.config import ModelConfig


class KVSlab:
    """One sequence's (or shard's) region of the arena: rows [start, start + capacity)."""

    def __init__(self, arena: torch.Tensor, start: int, capacity: int) -> None:
        self.arena = arena
        self.start = start
        self.capacity = capacity
        self.length = 0  # rows filled in every layer after a completed step

    def write(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows [row, row + n) of one layer; k, v: (n, Hkv, D)."""
        end = row + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KV slab overflow: row {end} > capacity {self.capacity}")
        self.arena[layer, 0, self.start + row : self.start + end] = k
        self.arena[layer, 1, self.start + row : self.start + end] = v

    def keys(self, layer: int, length: int) -> torch.Tensor:
        return self.arena[layer, 0, self.start : self.start + length]  # (T, Hkv, D)

    def values(self, layer: int, length: int) -> torch.Tensor:
        return self.arena[layer, 1, self.start : self.start + length]


class KVCache:
    """Owns the arena on one device and hands out regions (first fit, merged when freed)."""

    def __init__(self, cfg: ModelConfig, capacity_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"kv capacity_tokens={capacity_tokens}; give a positive number of tokens")
        self.cfg = cfg
        self.capacity_tokens = capacity_tokens
        self.dtype = dtype
        self.device = device
        self._arena: torch.Tensor | None = None  # allocated at first use
        self._free: list[tuple[int, int]] = [(0, capacity_tokens)]  # (start, length), sorted
        self._slabs: dict[str, KVSlab] = {}
        self.reserved_tokens = 0
        self._lock = threading.Lock()  # a pool member serves several bases from several threads

    @property
    def arena(self) -> torch.Tensor:
        if self._arena is None:
            c = self.cfg
            shape = (c.num_hidden_layers, 2, self.capacity_tokens, c.num_key_value_heads, c.head_dim)
            self._arena = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._arena

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.reserved_tokens

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether one contiguous region of `num_tokens` rows is free."""
        with self._lock:
            return any(length >= num_tokens for _, length in self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> KVSlab:
        arena = self.arena
        with self._lock:
            assert seq_id not in self._slabs, f"sequence {seq_id} already has a slab"
            i = next((i for i, (_, length) in enumerate(self._free) if length >= num_tokens), None)
            if i is None:
                raise MemoryError(f"KV cache full: {num_tokens} rows asked, {self.free_tokens} free")
            start, length = self._free[i]
            if length == num_tokens:
                del self._free[i]
            else:
                self._free[i] = (start + num_tokens, length - num_tokens)
            slab = KVSlab(arena, start, num_tokens)
            self._slabs[seq_id] = slab
            self.reserved_tokens += num_tokens
        return slab

    def get(self, seq_id: str) -> KVSlab:
        return self._slabs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._slabs

    def free(self, seq_id: str) -> None:
        with self._lock:
            slab = self._slabs.pop(seq_id, None)
            if slab is None:
                return
            self.reserved_tokens -= slab.capacity
            i = bisect.bisect(self._free, (slab.start, 0))
            self._free.insert(i, (slab.start, slab.capacity))
            # Merge with the neighbours so free space stays in as few regions as possible.
            if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
                self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]

    def seq_ids(self) -> list[str]:
        with self._lock:
            return list(self._slabs)


def capacity_from_memory(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, fraction: float = 0.9,
    cpu_budget_bytes: int = 1 << 30,
) -> int:
    """Tokens of KV that fit in `fraction` of the device's free memory (1 GiB worth on CPU)."""
    per_token = cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
    if device.type != "cuda":
        return max(cpu_budget_bytes // per_token, 1)
    free, _total = torch.cuda.mem_get_info(device)
    return max(int(free * fraction) // per_token, 1)
