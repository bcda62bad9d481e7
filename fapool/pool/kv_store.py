"""A pool member's KV store: one arena per device, a contiguous region per shard.

A base places each shard itself, in its own share of a member's arena (`fapool/pool/placement.py`);
a shard is written once at prefill and never grows, so regions suit it. All regions live in one
arena tensor (L, 2, rows, Hkv, D), so a decode step attends over every shard of the batch in one
varlen kernel call (region starts and lengths). A shard keeps only some token rows of a sequence,
in any order (decode attention does not care about row order; RoPE was applied before caching).
The base's own cache is paged: `fapool/paged_cache.py`.
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


class RowAllocator:
    """First-fit regions of rows [0, capacity), merged when freed. Holds no tensor: the KV cache
    runs one over its arena, and a base runs one per pool member to place its shards there."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted
        self._held: dict[str, tuple[int, int]] = {}
        self.reserved = 0

    def can_allocate(self, num_rows: int) -> bool:
        """Whether one contiguous region of `num_rows` rows is free."""
        return any(length >= num_rows for _, length in self._free)

    def allocate(self, key: str, num_rows: int) -> int:
        """The start of a free region of `num_rows` rows, now held by `key`."""
        i = next((i for i, (_, length) in enumerate(self._free) if length >= num_rows), None)
        if i is None:
            raise MemoryError(f"no {num_rows} contiguous rows free ({self.capacity - self.reserved} free in all)")
        start = self._free[i][0]
        self.place(key, start, num_rows)
        return start

    def place(self, key: str, start: int, num_rows: int) -> None:
        """Hold rows [start, start + num_rows) for `key`; they must be free."""
        assert key not in self._held, f"{key} already holds rows"
        i = bisect.bisect(self._free, (start, float("inf"))) - 1
        fs, fl = self._free[i] if i >= 0 else (0, 0)
        if not (fs <= start and start + num_rows <= fs + fl):
            raise ValueError(f"rows [{start}, {start + num_rows}) are not free; the placement overlaps a region in use")
        self._free[i : i + 1] = [r for r in ((fs, start - fs), (start + num_rows, fs + fl - start - num_rows)) if r[1]]
        self._held[key] = (start, num_rows)
        self.reserved += num_rows

    def free(self, key: str) -> tuple[int, int] | None:
        """Release `key`'s rows (start, length); None if it held none."""
        held = self._held.pop(key, None)
        if held is None:
            return None
        self.reserved -= held[1]
        i = bisect.bisect(self._free, (held[0], 0))
        self._free.insert(i, held)
        # Merge with the neighbours so free space stays in as few regions as possible.
        if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
        return held


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
        self._rows = RowAllocator(capacity_tokens)
        self._slabs: dict[str, KVSlab] = {}
        self._lock = threading.Lock()  # a pool member serves several bases from several threads

    @property
    def arena(self) -> torch.Tensor:
        if self._arena is None:
            # Under the lock: a pool member's threads for several bases can be first at once, and
            # two arenas would leave one base's shards written where its decodes never read.
            with self._lock:
                if self._arena is None:
                    c = self.cfg
                    shape = (c.num_hidden_layers, 2, self.capacity_tokens, c.num_key_value_heads, c.head_dim)
                    self._arena = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self._arena

    @property
    def reserved_tokens(self) -> int:
        return self._rows.reserved

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.reserved_tokens

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether one contiguous region of `num_tokens` rows is free."""
        with self._lock:
            return self._rows.can_allocate(num_tokens)

    def allocate(self, seq_id: str, num_tokens: int) -> KVSlab:
        arena = self.arena
        with self._lock:
            assert seq_id not in self._slabs, f"sequence {seq_id} already has a slab"
            try:
                start = self._rows.allocate(seq_id, num_tokens)
            except MemoryError as e:
                raise MemoryError(f"KV cache full: {e}") from None
            slab = self._slabs[seq_id] = KVSlab(arena, start, num_tokens)
        return slab

    def place(self, seq_id: str, start: int, num_tokens: int, stale_prefix: str | None = None) -> KVSlab:
        """A region at a start someone else chose (a base placing its shards on a pool member).
        Slabs whose id starts with `stale_prefix` and overlap it are dropped first: the chooser
        manages those rows, so what it places over is a shard it already gave up."""
        arena = self.arena
        with self._lock:
            assert seq_id not in self._slabs, f"sequence {seq_id} already has a slab"
            if stale_prefix is not None:
                over = [k for k, b in self._slabs.items() if b.start < start + num_tokens and start < b.start + b.capacity]
                if all(k.startswith(stale_prefix) for k in over):  # else refused below, nothing dropped
                    for key in over:
                        del self._slabs[key]
                        self._rows.free(key)
            self._rows.place(seq_id, start, num_tokens)
            slab = self._slabs[seq_id] = KVSlab(arena, start, num_tokens)
        return slab

    def get(self, seq_id: str) -> KVSlab:
        return self._slabs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._slabs

    def free(self, seq_id: str) -> None:
        with self._lock:
            if self._slabs.pop(seq_id, None) is not None:
                self._rows.free(seq_id)

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
