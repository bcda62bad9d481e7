"""Automatic prefix caching: which full KV pages hold which token prefix, who shares them, and
which to evict.

A full page is keyed by a hash chain: `key(page i) = H(key(page i-1), tokens of page i)`, so a key
names the page's tokens *and* every token before it (its rows' K, V depend on all of them) and,
through its place in the chain, their positions. Nothing else changes a page's KV within one
engine: the weights, dtype, RoPE, page size and attention kernel are fixed for the engine's life,
and the arena dies with it (there is no LoRA, no per-request salt and no multimodal input here).
H is BLAKE2b-128, not Python's `hash`: a collision would silently give one prompt another's KV.

The rules are vLLM v1's (KVCacheManager / BlockPool) and nano-vllm's block manager:
- a hit is whole pages only, capped so that at least the prompt's last token is computed (its
  logits are needed); a prompt that diverges inside a page recomputes that page in new pages, so
  a hit never writes into a shared page;
- a page is published only once it is full and a step has written its KV (`PagedKVCache.commit`);
- every page has a reference count (the sequences whose page list holds it); a page whose count
  drops to 0 stays cached, idle, and is evicted in LRU order only when no free page is left;
- freeing (finish, cancel, preempt) only drops references: a page another sequence holds stays.

Pure host-side bookkeeping: `PagedKVCache` owns the pages and calls this under its lock.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

Key = bytes


def extend_keys(parents: list[Key], tokens: Sequence[int], page_size: int) -> list[Key]:
    """`parents` (the keys of a sequence's first pages) followed by the keys of the full pages in
    `tokens`, the tokens right after those pages (a trailing part page has no key)."""
    keys = list(parents)
    arr = np.asarray(tokens, dtype=np.int64)
    prev = keys[-1] if keys else b""
    for i in range(len(arr) // page_size):
        prev = hashlib.blake2b(prev + arr[i * page_size : (i + 1) * page_size].tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixIndex:
    """Reference counts of every page, the published pages by key, and the idle ones in LRU order."""

    def __init__(self, num_pages: int) -> None:
        self.refs = [0] * num_pages
        self.key_of: dict[int, Key] = {}
        self.page_of: dict[Key, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # published, unreferenced; oldest first
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of them, tokens found cached

    def longest(self, keys: list[Key]) -> list[int]:
        """Pages of the longest cached prefix of these keys."""
        pages = []
        for k in keys:
            p = self.page_of.get(k)
            if p is None:
                break
            pages.append(p)
        return pages

    def idle_among(self, pages: list[int]) -> int:
        return sum(1 for p in pages if self.refs[p] == 0)

    def acquire(self, pages: list[int]) -> None:
        for p in pages:
            if self.refs[p] == 0:
                self.idle.pop(p, None)
            self.refs[p] += 1

    def release(self, pages: list[int]) -> list[int]:
        """Drop one reference of each page; returns those now free (unpublished, unreferenced).
        Published ones go idle, the sequence's last pages first so they are evicted first (a
        prefix's tail is the part the fewest other prompts share)."""
        freed = []
        for p in reversed(pages):
            self.refs[p] -= 1
            assert self.refs[p] >= 0, f"page {p} released more often than acquired"
            if self.refs[p] == 0:
                if p in self.key_of:
                    self.idle[p] = None
                else:
                    freed.append(p)
        return freed

    def evict(self) -> int | None:
        """The least recently used idle page, forgotten; None when none is idle."""
        if not self.idle:
            return None
        p, _ = self.idle.popitem(last=False)
        del self.page_of[self.key_of.pop(p)]
        return p

    def publish(self, page: int, key: Key) -> bool:
        """Name a full, written page by its key. False where another page has that key already
        (two sequences computed the same page at once): this one stays private and is freed at
        its end, as in vLLM."""
        if key in self.page_of or page in self.key_of:
            return False
        self.page_of[key] = page
        self.key_of[page] = key
        if self.refs[page] == 0:
            self.idle[page] = None
        return True

    @property
    def cached_pages(self) -> int:
        """Published pages, in use or idle."""
        return len(self.key_of)
