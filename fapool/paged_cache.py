"""The base's KV cache: fixed-size pages, a page list per sequence, allocated as it grows.

A sequence holds pages only for the rows it has (its prompt, then one more page every
`page_size` generated tokens) and gives them back when it ends, so a request that asks for 4,096
tokens and stops after 10 holds about 10 rows, not 4,106. When pages run out the scheduler
preempts (recompute), instead of refusing up front.

All pages live in one arena (L, 2, pages * page_size, Hkv, D): per layer, K and V viewed as
(pages, page_size, Hkv, D) are what paged kernels (flash-attn-4's `page_table`) read, and a
row's slot is `page * page_size + offset`. Page 0 is never handed out: padding rows of a
captured decode step write there. The arena starts zeroed, because a paged kernel reads whole
pages and the rows past a sequence's end must hold finite numbers.

"Rows" rather than "positions": a local sequence's row r is its token at position r; a pooled
sequence keeps only its own share of rows on the base (see `fapool/pool/pooled_attention.py`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from fapool.config import ModelConfig


@dataclass(eq=False)
class PagedSeq:
    row: int  # its row of the host page table
    pages: list[int] = field(default_factory=list)
    length: int = 0  # rows filled in every layer after a completed step


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, capacity_tokens: int, dtype: torch.dtype, device: torch.device,
                 page_size: int = 16, max_seq_tokens: int | None = None) -> None:
        if page_size < 1:
            raise ValueError(f"page_size={page_size}; use a positive number of rows (16 or 128)")
        if capacity_tokens < page_size:
            raise ValueError(f"kv capacity_tokens={capacity_tokens}; give at least one page ({page_size} tokens)")
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.page_size = page_size
        self.num_pages = capacity_tokens // page_size + 1  # + the scratch page 0
        self.capacity_tokens = (self.num_pages - 1) * page_size
        longest = min(max_seq_tokens or self.capacity_tokens, self.capacity_tokens)
        self.max_pages_per_seq = -(-longest // page_size)
        self._free = list(range(self.num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._seqs: dict[str, PagedSeq] = {}
        # Every sequence's pages as a row of one host table, kept up to date as pages come and go,
        # so a step's page table is one fancy index, not a loop over page lists.
        self._table = np.zeros((64, self.max_pages_per_seq), dtype=np.int32)
        self._free_rows = list(range(63, -1, -1))
        self._arena: torch.Tensor | None = None
        self._lock = threading.Lock()

    # ---- memory ----------------------------------------------------------------------------
    @property
    def arena(self) -> torch.Tensor:
        if self._arena is None:
            with self._lock:  # made once, whichever thread comes first
                if self._arena is None:
                    c = self.cfg
                    shape = (c.num_hidden_layers, 2, self.num_pages * self.page_size, c.num_key_value_heads,
                             c.head_dim)
                    self._arena = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self._arena

    def pages_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as (pages, page_size, Hkv, D)."""
        a = self.arena[layer]
        shape = (self.num_pages, self.page_size, *a.shape[-2:])
        return a[0].view(shape), a[1].view(shape)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def reserved_tokens(self) -> int:
        """Rows held by live sequences (whole pages)."""
        return (self.num_pages - 1 - len(self._free)) * self.page_size

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.page_size

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page_size)

    # ---- sequences -------------------------------------------------------------------------
    def can_allocate(self, rows: int) -> bool:
        return self.pages_for(rows) <= len(self._free)

    def allocate(self, seq_id: str, rows: int) -> PagedSeq:
        """A new sequence with pages for its first `rows` rows; MemoryError when they are not free."""
        with self._lock:
            assert seq_id not in self._seqs, f"sequence {seq_id} already holds pages"
            if not self._free_rows:
                n = len(self._table)
                self._table = np.concatenate([self._table, np.zeros_like(self._table)])
                self._free_rows = list(range(2 * n - 1, n - 1, -1))
            seq = self._seqs[seq_id] = PagedSeq(self._free_rows.pop())
        if not self.grow(seq_id, rows):
            self.free(seq_id)
            raise MemoryError(f"KV cache full: {self.pages_for(rows)} pages wanted, {len(self._free)} free")
        return seq

    def grow(self, seq_id: str, rows: int) -> bool:
        """Make room for `rows` rows in all; False (and nothing taken) when the pages are not free."""
        seq = self._seqs[seq_id]
        need = self.pages_for(rows) - len(seq.pages)
        if need <= 0:
            return True
        if len(seq.pages) + need > self.max_pages_per_seq:
            raise ValueError(f"sequence {seq_id} would need {rows} rows; at most "
                             f"{self.max_pages_per_seq * self.page_size} fit one sequence")
        with self._lock:
            if need > len(self._free):
                return False
            new = [self._free.pop() for _ in range(need)]
            self._table[seq.row, len(seq.pages) : len(seq.pages) + need] = new
            seq.pages += new
        return True

    def free(self, seq_id: str) -> None:
        with self._lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                self._free += reversed(seq.pages)
                self._table[seq.row] = 0
                self._free_rows.append(seq.row)

    def get(self, seq_id: str) -> PagedSeq:
        return self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[str]:
        with self._lock:
            return list(self._seqs)

    # ---- addressing ------------------------------------------------------------------------
    def slots(self, seq_id: str, start: int, end: int) -> np.ndarray:
        """Arena rows of the sequence's rows [start, end)."""
        pages = np.asarray(self._seqs[seq_id].pages, dtype=np.int64)
        r = np.arange(start, end, dtype=np.int64)
        return pages[r // self.page_size] * self.page_size + r % self.page_size

    def page_table(self, seq_ids: list[str], width: int | None = None) -> np.ndarray:
        """(B, width) int32: each sequence's pages, padded with the scratch page 0."""
        seqs = [self._seqs[s] for s in seq_ids]
        width = width or max((len(q.pages) for q in seqs), default=1) or 1
        return self._table[[q.row for q in seqs], :width]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k, v (N, Hkv, D) at arena rows `slots` (N,) int64 on the device."""
        a = self.arena
        a[layer, 0].index_copy_(0, slots, k)
        a[layer, 1].index_copy_(0, slots, v)

    def gather(self, layer: int, seq_id: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous copy of the sequence's first `length` rows of one layer (fallback kernels)."""
        idx = torch.from_numpy(self.slots(seq_id, 0, length)).to(self.device)
        a = self.arena
        return a[layer, 0].index_select(0, idx), a[layer, 1].index_select(0, idx)
