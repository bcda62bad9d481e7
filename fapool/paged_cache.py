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

Prefix caching (`fapool/prefix_cache.py`, on unless `prefix_caching=False`): a sequence allocated
with its tokens starts with the cached pages of its longest cached prefix, shared read-only and
counted by reference; `commit` publishes its pages as they fill. Pages of finished sequences stay
cached, idle, until a new page finds no free one and the least recently used idle page is evicted.
A pooled sequence's share is not a prefix and is never published; instead its prefill also
writes a full copy of its prompt's full pages into pages of their own (`shadow`), published after
that step and idle at once: the next prompt with that prefix finds it on the base.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
import torch

from fapool.config import ModelConfig
from fapool.prefix_cache import Key, PrefixIndex, extend_keys

MEMO_SEQS = 64  # waiting prompts whose page keys are kept between admission attempts


@dataclass(eq=False)
class PagedSeq:
    row: int  # its row of the host page table
    pages: list[int] = field(default_factory=list)
    length: int = 0  # rows filled in every layer after a completed step
    keys: list[Key] | None = None  # keys of its first pages (published or hit); None: never published
    shadow: list[tuple[int, Key, int]] = field(default_factory=list)  # pooled: (prompt page, key, page)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, capacity_tokens: int, dtype: torch.dtype, device: torch.device,
                 page_size: int = 16, max_seq_tokens: int | None = None, prefix_caching: bool = True) -> None:
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
        self.prefix = PrefixIndex(self.num_pages) if prefix_caching else None
        # A waiting prompt is looked up at every admission attempt: its keys are computed once.
        self._memo: OrderedDict[str, tuple[Seq[int], list[Key]]] = OrderedDict()

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
        """Pages a sequence can take: free ones and idle cached ones (evicted when taken)."""
        return len(self._free) + (len(self.prefix.idle) if self.prefix is not None else 0)

    @property
    def reserved_tokens(self) -> int:
        """Rows held by live sequences (whole pages)."""
        return (self.num_pages - 1 - self.free_pages) * self.page_size

    @property
    def free_tokens(self) -> int:
        return self.free_pages * self.page_size

    @property
    def cached_tokens(self) -> int:
        """Rows of published pages, in use or idle: what prefix caching holds."""
        return self.prefix.cached_pages * self.page_size if self.prefix is not None else 0

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page_size)

    # ---- sequences -------------------------------------------------------------------------
    def can_allocate(self, rows: int, seq_id: str | None = None, tokens: Seq[int] | None = None) -> bool:
        """Whether a sequence of `rows` rows fits now; with its `tokens`, counting its cached prefix."""
        with self._lock:
            hit = self._hit(seq_id, tokens) if tokens is not None else []
            idle_hit = self.prefix.idle_among(hit) if hit else 0
            return self.pages_for(rows) - len(hit) <= self.free_pages - idle_hit

    def allocate(self, seq_id: str, rows: int, tokens: Seq[int] | None = None) -> PagedSeq:
        """A new sequence with pages for its first `rows` rows; MemoryError when they are not free.
        Given its `tokens` (with prefix caching on), it starts with the pages of its longest cached
        prefix and its `length` is their rows: the prefill starts there."""
        with self._lock:
            assert seq_id not in self._seqs, f"sequence {seq_id} already holds pages"
            if not self._free_rows:
                n = len(self._table)
                self._table = np.concatenate([self._table, np.zeros_like(self._table)])
                self._free_rows = list(range(2 * n - 1, n - 1, -1))
            seq = self._seqs[seq_id] = PagedSeq(self._free_rows.pop())
            if self.prefix is not None and tokens is not None:
                hit = self._hit(seq_id, tokens)
                seq.keys = self._memo.pop(seq_id)[1][: len(hit)]
                self.prefix.acquire(hit)
                self._table[seq.row, : len(hit)] = hit
                seq.pages, seq.length = list(hit), len(hit) * self.page_size
                self.prefix.queries += len(tokens)
                self.prefix.hits += seq.length
        if not self.grow(seq_id, rows):
            self.free(seq_id)
            raise MemoryError(f"KV cache full: {self.pages_for(rows)} pages wanted, {self.free_pages} free")
        return seq

    def cached_rows(self, seq_id: str | None, tokens: Seq[int]) -> int:
        """Rows of `tokens` an allocation now would find cached (nothing is taken)."""
        with self._lock:
            return len(self._hit(seq_id, tokens)) * self.page_size

    def _hit(self, seq_id: str | None, tokens: Seq[int]) -> list[int]:
        """Pages of the longest cached prefix of `tokens`, whole pages, the last token left out (its
        logits are needed, so it is computed). Keys are memoised per waiting sequence."""
        if self.prefix is None:
            return []
        memo = self._memo.get(seq_id) if seq_id is not None else None
        if memo is not None and memo[0] is tokens:  # the same list: a sequence's tokens only grow
            keys = memo[1]
        else:
            keys = extend_keys([], tokens[: (len(tokens) - 1) // self.page_size * self.page_size], self.page_size)
        if seq_id is not None:
            self._memo[seq_id] = (tokens, keys)
            self._memo.move_to_end(seq_id)
            while len(self._memo) > MEMO_SEQS:
                self._memo.popitem(last=False)
        return self.prefix.longest(keys)

    def commit(self, seq_id: str, tokens: Callable[[int, int], Seq[int]], known: int) -> None:
        """Publish the sequence's pages that are full and written: rows below both its `length` (set
        after the step that wrote them) and `known` (tokens the host has; async decode's last token
        may still be on the device). `tokens(start, end)` gives its token ids."""
        seq = self._seqs.get(seq_id)
        if self.prefix is None or seq is None:
            return
        if seq.shadow and seq.length > 0:  # the pooled prefill that wrote the copy is done
            with self._lock:
                for _, key, page in seq.shadow:
                    self.prefix.publish(page, key)
                self._free += self.prefix.release([p for _, _, p in seq.shadow])
                seq.shadow = []
        if seq.keys is None:
            return
        full = min(seq.length, known) // self.page_size
        done = len(seq.keys)
        if full <= done:
            return
        parent = seq.keys[-1:]
        new = extend_keys(parent, tokens(done * self.page_size, full * self.page_size), self.page_size)[len(parent):]
        with self._lock:
            for page, key in zip(seq.pages[done:full], new):
                self.prefix.publish(page, key)
            seq.keys += new

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
            if need > self.free_pages:
                return False
            new = self._take(need)
            self._table[seq.row, len(seq.pages) : len(seq.pages) + need] = new
            seq.pages += new
        return True

    def shadow(self, seq_id: str, tokens: Seq[int]) -> None:
        """A pooled sequence keeps only its share of rows in its pages: give it pages for a full
        copy of its prompt's full pages not cached yet, as many as are free (idle ones evicted), for
        its prefill to write (`shadow_rows`) and `commit` to publish."""
        if self.prefix is None:
            return
        ps = self.page_size
        with self._lock:
            seq = self._seqs[seq_id]
            keys = extend_keys([], tokens[: len(tokens) // ps * ps], ps)
            # Its pages already cached are pinned meanwhile: the copy evicts only other prefixes.
            pinned = [self.prefix.page_of[k] for k in keys if k in self.prefix.page_of]
            self.prefix.acquire(pinned)
            want = [(i, k) for i, k in enumerate(keys) if k not in self.prefix.page_of][: self.free_pages]
            seq.shadow = [(i, k, p) for (i, k), p in zip(want, self._take(len(want)))]
            self.prefix.release(pinned)  # published: idle again, none freed
            self.prefix.queries += len(tokens)  # looked up, and prefilled whole: no hit

    def shadow_rows(self, seq_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows of its prompt, their arena slots) of a pooled sequence's shadow pages."""
        ps, shadow = self.page_size, self._seqs[seq_id].shadow
        offset = np.arange(ps, dtype=np.int64)
        rows = np.concatenate([i * ps + offset for i, _, _ in shadow]) if shadow else np.zeros(0, np.int64)
        slots = np.concatenate([p * ps + offset for _, _, p in shadow]) if shadow else np.zeros(0, np.int64)
        return rows, slots

    def reset_prefix(self) -> None:
        """Forget the idle cached pages and the hit counters (after warm-up)."""
        with self._lock:
            if self.prefix is not None:
                while (p := self.prefix.evict()) is not None:
                    self._free.append(p)
                self.prefix.queries = self.prefix.hits = 0

    def _take(self, n: int) -> list[int]:
        """n pages for one holder: free ones first, then idle cached ones, least recently used first."""
        take = min(n, len(self._free))
        pages = [self._free.pop() for _ in range(take)]
        if self.prefix is not None:
            pages += [self.prefix.evict() for _ in range(n - take)]
            self.prefix.acquire(pages)
        return pages

    def free(self, seq_id: str) -> None:
        with self._lock:
            self._memo.pop(seq_id, None)
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                # With prefix caching: a page another sequence shares stays; a published one idles.
                self._free += reversed(seq.pages) if self.prefix is None else self.prefix.release(seq.pages)
                if seq.shadow:  # a pooled prefill that never completed
                    self._free += self.prefix.release([p for _, _, p in seq.shadow])
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
