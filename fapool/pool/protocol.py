"""The wire protocol between a base (rank 0) and its pool members over one data-plane group.

Each step the base broadcasts a header (op + int64 body), then one exchange per layer:

PREFILL  body: n, then per sequence: handle, num_tokens, num_parts, rank of parts 1.. (part 0 is
         the base), then the arena row where each of parts 1.. starts on its member: the base
         places its shards itself (in its share of each member's arena), so a member never
         refuses one for want of a contiguous region. Rows split into query blocks by
         `query_blocks(num_tokens, num_parts)`.
         Per layer: base broadcasts [q | k | v] of all pooled tokens, (T, Hq + 2 Hkv, D); each
         member sends back its blocks' outputs, (R, Hq, D), and keeps its blocks' K, V as its shard.
DECODE   body: n, then handles. Per layer: base broadcasts q, (M, Hq, D); then one gather to the
         base of every rank's partial result, packed as `PartLayout` bytes: out (M, Hq, D) and
         lse (Hq, M) float32 (-inf where it holds no shard); the base's own part is rank 0's.
         One collective instead of two messages per member keeps the base's host work flat.
FREE     body: handles whose shards to drop.
STOP     the group is retired (a new epoch replaces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.attention import query_blocks

OP_PREFILL, OP_DECODE, OP_FREE, OP_STOP = 1, 2, 3, 4
SPLIT_SCHEME = "zigzag"
TAG_OUT = 1


@dataclass(frozen=True)
class PrefillItem:
    handle: int
    num_tokens: int
    ranks: tuple[int, ...]  # rank of each part; ranks[0] == 0 is the base
    starts: tuple[int, ...] = ()  # arena row of each part's shard on its holder; starts[0] unused

    def start_of(self, rank: int) -> int:
        return self.starts[self.ranks.index(rank)]

    def ranges_of(self, rank: int) -> list[tuple[int, int]]:
        """Row ranges [start, end) this rank computes and keeps (none if it takes no part)."""
        if rank not in self.ranks:
            return []
        return query_blocks(self.num_tokens, len(self.ranks), SPLIT_SCHEME)[self.ranks.index(rank)]


def encode_prefill(items: list[PrefillItem]) -> list[int]:
    body = [len(items)]
    for it in items:
        assert len(it.starts) == len(it.ranks), "a start row for every part"
        body += [it.handle, it.num_tokens, len(it.ranks), *it.ranks[1:], *it.starts[1:]]
    return body


def decode_prefill(body: list[int]) -> list[PrefillItem]:
    items, i = [], 1
    for _ in range(body[0]):
        handle, n, parts = body[i : i + 3]
        ranks = (0, *body[i + 3 : i + 2 + parts])
        starts = (0, *body[i + 2 + parts : i + 1 + 2 * parts])
        items.append(PrefillItem(handle, n, ranks, starts))
        i += 1 + 2 * parts
    return items


def rows_of(items: list[PrefillItem], rank: int) -> int:
    return sum(e - s for it in items for s, e in it.ranges_of(rank))


@dataclass(frozen=True)
class PartLayout:
    """One rank's partial decode result as bytes: out (M, Hq, D) in the model dtype, then lse
    (Hq, M) float32. Bytes, so a single gather carries both."""

    m: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def out_bytes(self) -> int:
        return self.m * self.heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.out_bytes + 4 * self.heads * self.m

    def empty(self, parts: int, device: torch.device) -> torch.Tensor:
        assert self.out_bytes % 4 == 0, "lse must start 4-byte aligned"
        return torch.empty(parts * self.nbytes, dtype=torch.uint8, device=device)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(parts, M, Hq, D) outs and (parts, Hq, M) lses over a buffer from `empty`."""
        rows = buf.view(-1, self.nbytes)
        out = rows[:, : self.out_bytes].view(self.dtype).view(-1, self.m, self.heads, self.head_dim)
        lse = rows[:, self.out_bytes :].view(torch.float32).view(-1, self.heads, self.m)
        return out, lse
