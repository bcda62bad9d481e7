"""The pool's two exact splits of one attention layer (ARCHITECTURE §2).

- Query blocks (prefill): member i owns some rows of Q, sees K, V up to its last row, and
  returns exact rows of the output; the base concatenates them.
- KV shards (decode): member j owns a contiguous slice of K, V and returns a partial output and
  its LSE; the base merges partials pairwise with the LSE rule (:func:`merge_tree`).

``split_prefill`` and ``split_decode`` run the whole protocol in one process; they are what the
pool must equal and what tests compare against the unsplit kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fapool.attention.base import AttentionKernel
from fapool.attention.merge import causal_by_diagonal, merge, merge_tree

__all__ = [
    "MAX_PARTS",
    "SCHEMES",
    "decode_partial",
    "kv_shards",
    "merge",
    "merge_tree",
    "prefill_block",
    "query_blocks",
    "split_decode",
    "split_prefill",
]

MAX_PARTS = 33  # 32 pool members plus the base, which computes a part of its own
SCHEMES = ("zigzag", "contiguous")


def _check_split(n: int, parts: int) -> None:
    if not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"parts={parts} is out of range; use 1..{MAX_PARTS} (up to 32 pool members and the base)")
    if n < 0:
        raise ValueError(f"n={n} rows is negative; pass a length >= 0")


def query_blocks(n: int, parts: int, scheme: str = "zigzag") -> list[list[tuple[int, int]]]:
    """For each of ``parts`` members, the [start, end) row ranges of ``n`` query rows it owns.

    "contiguous": member i gets block i of a ceil split (blocks of ceil(n / parts) rows, so the
    last members may get fewer or none). "zigzag": n is cut into 2 * parts near-equal blocks and
    member i gets blocks i and 2 * parts - 1 - i, pairing a cheap early block with an expensive
    late one so causal work is balanced. Ranges are disjoint, non-empty, ascending, and cover
    [0, n); a member may own no range when n is small.
    """
    _check_split(n, parts)
    if scheme == "contiguous":
        size = math.ceil(n / parts) if n else 0
        blocks = [[(i * size, min((i + 1) * size, n))] for i in range(parts)]
    elif scheme == "zigzag":
        cuts = [b * n // (2 * parts) for b in range(2 * parts + 1)]
        blocks = []
        for i in range(parts):
            j = 2 * parts - 1 - i
            if j == i + 1:  # the middle pair is adjacent: one range, not two
                blocks.append([(cuts[i], cuts[j + 1])])
            else:
                blocks.append([(cuts[i], cuts[i + 1]), (cuts[j], cuts[j + 1])])
    else:
        raise ValueError(f"unknown query split scheme {scheme!r}; choose one of {list(SCHEMES)}")
    return [[(s, e) for s, e in ranges if e > s] for ranges in blocks]


def kv_shards(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [start, end) ranges of ``n`` KV positions, one per member (sizes
    differ by at most one; members past ``n`` get empty ranges so index j is always member j)."""
    _check_split(n, parts)
    return [(j * n // parts, (j + 1) * n // parts) for j in range(parts)]


def prefill_block(
    kernel: AttentionKernel, q_rows: Tensor, k_prefix: Tensor, v_prefix: Tensor, *,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal attention of the query rows at positions [s, e) against keys [0, e).

    q_rows: (e - s, Hq, D); k_prefix, v_prefix: (e, Hkv, D). Computed as a non-causal part over
    keys [0, s) and a causal square over [s, e), merged by LSE: what a pool member computes for
    one of its query blocks. Returns out (e - s, Hq, D), lse (Hq, e - s).
    """
    tq, tk = q_rows.shape[0], k_prefix.shape[0]
    if tq > tk:
        raise ValueError(f"query block of {tq} rows needs at least {tq} keys, got {tk}")
    if tq == 0:
        return kernel.forward(q_rows, k_prefix, v_prefix, causal=True, scale=scale)
    scale = 1.0 / math.sqrt(q_rows.shape[-1]) if scale is None else scale

    def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, s: float) -> tuple[Tensor, Tensor]:
        return kernel.forward(q, k, v, causal=causal, scale=s)

    return causal_by_diagonal(attend, q_rows, k_prefix, v_prefix, scale)


def split_prefill(
    kernel: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, parts: int,
    scheme: str = "zigzag", scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal self-attention (q, k, v all T rows) computed block by block as the pool would, and
    reassembled in row order. Equals ``kernel.forward(q, k, v, causal=True)``."""
    n = q.shape[0]
    if k.shape[0] != n:
        raise ValueError(f"split_prefill is self-attention: q has {n} rows but k has {k.shape[0]}")
    out = torch.empty_like(q)  # (T, Hq, D)
    lse = torch.full((q.shape[1], n), -math.inf, dtype=torch.float32, device=q.device)  # (Hq, T)
    covered = 0
    for ranges in query_blocks(n, parts, scheme):
        for s, e in ranges:
            out[s:e], lse[:, s:e] = prefill_block(kernel, q[s:e], k[:e], v[:e], scale=scale)
            covered += e - s
    assert covered == n, (covered, n)
    return out, lse


def decode_partial(
    kernel: AttentionKernel, q: Tensor, k_shard: Tensor, v_shard: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Non-causal attention of the new query rows against one KV shard: a member's decode reply.
    An empty shard gives zeros and -inf, which merge as nothing."""
    return kernel.forward(q, k_shard, v_shard, causal=False, scale=scale)


def shard_partial(
    kernel: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, start: int, end: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Partial attention of the newest Tq rows (key positions [Tk - Tq, Tk)) against the shard
    [start, end) of k, v, honouring the causal mask.

    Rows at positions >= end see the whole shard (:func:`decode_partial`); rows inside the shard
    see it up to themselves (:func:`prefill_block` on the shard); rows before it see nothing.
    Returns out (Tq, Hq, D), lse (Hq, Tq).
    """
    tq, tk = q.shape[0], k.shape[0]
    first = tk - tq  # key position of query row 0
    k_s, v_s = k[start:end], v[start:end]
    if first >= end:  # every query row comes after the shard: the decode fast path
        return decode_partial(kernel, q, k_s, v_s, scale)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], tq), -math.inf, dtype=torch.float32, device=q.device)
    inside = (max(start, first) - first, end - first)  # rows whose position lies in the shard
    after = (end - first, tq)  # rows past the shard
    if inside[1] > inside[0]:
        a, b = inside
        # These rows end at the shard's last key, so the bottom-right rule on the shard holds.
        out[a:b], lse[:, a:b] = prefill_block(kernel, q[a:b], k_s, v_s, scale=scale)
    if after[1] > after[0]:
        a, b = after
        out[a:b], lse[:, a:b] = decode_partial(kernel, q[a:b], k_s, v_s, scale)
    return out, lse


def split_decode(
    kernel: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, parts: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of the newest Tq tokens' queries against KV sharded over ``parts`` members.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D), already holding those Tq tokens at the end. KV is cut by
    :func:`kv_shards`, each shard's partial computed, and partials merged by :func:`merge_tree`.
    Equals ``kernel.forward(q, k, v, causal=True)``. For Tq == 1 every shard is non-causal; for
    Tq > 1 the shards holding query positions apply the causal diagonal (:func:`shard_partial`).
    """
    if q.shape[0] > k.shape[0]:
        raise ValueError(
            f"split_decode got {q.shape[0]} query rows but only {k.shape[0]} keys; k, v must "
            "already include the new tokens"
        )
    shards = kv_shards(k.shape[0], parts)
    partials = [shard_partial(kernel, q, k, v, s, e, scale) for s, e in shards]
    return merge_tree(partials)
