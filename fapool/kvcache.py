"""KV cache: per-sequence slabs reserved up front, with capacity accounting in tokens.

A sequence reserves room for its whole life (prompt + max_tokens) when it is admitted, so a
running batch can never run out of memory halfway: when the cache is full, new requests wait.
The same store holds shards: a pool member keeps only some token rows of a sequence, in any order
(decode attention does not care about row order; RoPE was applied before caching).
"""
from __future__ import annotations

import threading

import torch

from fapool.config import ModelConfig


class KVSlab:
    """Keys and values of one sequence (or one shard of it), all layers: (L, 2, cap, Hkv, D)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.num_hidden_layers, 2, capacity, cfg.num_key_value_heads, cfg.head_dim)
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # rows filled in every layer after a completed step

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows [start, start + n) of one layer; k, v: (n, Hkv, D)."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KV slab overflow: row {end} > capacity {self.capacity}")
        self.data[layer, 0, start:end] = k
        self.data[layer, 1, start:end] = v

    def keys(self, layer: int, length: int) -> torch.Tensor:
        return self.data[layer, 0, :length]  # (T, Hkv, D)

    def values(self, layer: int, length: int) -> torch.Tensor:
        return self.data[layer, 1, :length]


class KVCache:
    """Owns the slabs of the sequences on one device and accounts for their reserved tokens."""

    def __init__(self, cfg: ModelConfig, capacity_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"kv capacity_tokens={capacity_tokens}; give a positive number of tokens")
        self.cfg = cfg
        self.capacity_tokens = capacity_tokens
        self.dtype = dtype
        self.device = device
        self._slabs: dict[str, KVSlab] = {}
        self.reserved_tokens = 0
        self._lock = threading.Lock()  # a pool member serves several bases from several threads

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.reserved_tokens

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self.free_tokens

    def allocate(self, seq_id: str, num_tokens: int) -> KVSlab:
        with self._lock:
            assert seq_id not in self._slabs, f"sequence {seq_id} already has a slab"
            if not self.can_allocate(num_tokens):
                raise MemoryError(f"KV cache full: {num_tokens} tokens asked, {self.free_tokens} free")
            self.reserved_tokens += num_tokens
        slab = KVSlab(self.cfg, num_tokens, self.dtype, self.device)
        self._slabs[seq_id] = slab
        return slab

    def get(self, seq_id: str) -> KVSlab:
        return self._slabs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._slabs

    def free(self, seq_id: str) -> None:
        with self._lock:
            slab = self._slabs.pop(seq_id, None)
            if slab is not None:
                self.reserved_tokens -= slab.capacity

    def seq_ids(self) -> list[str]:
        return list(self._slabs)


def capacity_from_memory(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, fraction: float = 0.9, cpu_default: int = 1 << 17
) -> int:
    """Tokens of KV that fit in `fraction` of the device's free memory (a fixed default on CPU)."""
    if device.type != "cuda":
        return cpu_default
    free, _total = torch.cuda.mem_get_info(device)
    per_token = cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
    return max(int(free * fraction) // per_token, 0)
