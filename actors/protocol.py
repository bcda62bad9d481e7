"""The wire protocol between a base (rank 0) and its pool members over one data-plane group.

Each step the base broadcasts a header (op + int64 body), then one exchange per layer:

PREFILL  body: n, then per sequence: handle, num_tokens, num_parts, rank of parts 1.. (part 0 is
         the base). Rows split into query blocks by `query_blocks(num_tokens, num_parts)`.
         Per layer: base broadcasts [q | k | v] of all pooled tokens, (T, Hq + 2 Hkv, D); each
         member sends back its blocks' outputs, (R, Hq, D), and keeps its blocks' K, V as its shard.
DECODE   body: n, then handles. Per layer: base broadcasts q, (M, Hq, D); each member sends back
         its partial out (M, Hq, D) and lse (Hq, M) float32 (-inf where it holds no shard).
FREE     body: handles whose shards to drop.
STOP     the group is retired (a new epoch replaces it).
"""
from __future__ import annotations

from dataclasses import dataclass

from fapool.attention import query_blocks

OP_PREFILL, OP_DECODE, OP_FREE, OP_STOP = 1, 2, 3, 4
SPLIT_SCHEME = "zigzag"
TAG_OUT, TAG_LSE = 1, 2


@dataclass(frozen=True)
class PrefillItem:
    handle: int
    num_tokens: int
    ranks: tuple[int, ...]  # rank of each part; ranks[0] == 0 is the base

    def ranges_of(self, rank: int) -> list[tuple[int, int]]:
        """Row ranges [start, end) this rank computes and keeps (none if it takes no part)."""
        if rank not in self.ranks:
            return []
        return query_blocks(self.num_tokens, len(self.ranks), SPLIT_SCHEME)[self.ranks.index(rank)]


def encode_prefill(items: list[PrefillItem]) -> list[int]:
    body = [len(items)]
    for it in items:
        body += [it.handle, it.num_tokens, len(it.ranks), *it.ranks[1:]]
    return body


def decode_prefill(body: list[int]) -> list[PrefillItem]:
    items, i = [], 1
    for _ in range(body[0]):
        handle, n, parts = body[i : i + 3]
        ranks = (0, *body[i + 3 : i + 2 + parts])
        items.append(PrefillItem(handle, n, ranks))
        i += 2 + parts
    return items


def rows_of(items: list[PrefillItem], rank: int) -> int:
    return sum(e - s for it in items for s, e in it.ranges_of(rank))
