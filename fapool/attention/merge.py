"""Exact combination of partial attention results by their log-sum-exp (LSE).

Two attention results over disjoint key sets combine exactly: if ``o_x`` is the softmax-weighted
sum of values over key set ``x`` and ``lse_x`` the log of its softmax denominator, then over the
union ``lse = logaddexp(lse_a, lse_b)`` and ``o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b``.
Every split in this package (query blocks at prefill, KV shards at decode, and the bottom-right
causal mask built from top-left causal kernels) is reassembled with this one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# attend(q, k, v, causal, scale) -> (out (Tq, H, D), lse (H, Tq)); ``causal`` is only ever
# requested for square problems (Tq == Tk), where top-left and bottom-right masks agree.
AttendFn = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]


def merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets.

    ``o_*`` are (T, H, D), ``lse_*`` are (H, T). A side with ``lse == -inf`` (no keys, such as an
    empty KV shard) contributes nothing; if both sides are empty the result is zeros and ``-inf``.
    Computed in float32; returns ``o`` in ``o_a``'s dtype and ``lse`` float32 (H, T).
    """
    assert o_a.shape == o_b.shape, (o_a.shape, o_b.shape)
    assert lse_a.shape == lse_b.shape == (o_a.shape[1], o_a.shape[0]), (lse_a.shape, o_a.shape)
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)  # (H, T)
    # -inf - -inf is NaN; anchoring empty rows at 0 makes both weights exp(-inf) = 0 instead.
    anchor = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - anchor).transpose(0, 1).unsqueeze(-1)  # (T, H, 1)
    w_b = torch.exp(lse_b - anchor).transpose(0, 1).unsqueeze(-1)  # (T, H, 1)
    o = w_a * o_a.float() + w_b * o_b.float()  # (T, H, D)
    return o.to(o_a.dtype), lse


def merge_tree(partials: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partial results pairwise, neighbours level by level (the paper's hierarchical
    reduction), so a pool of p members needs ceil(log2 p) rounds rather than p - 1.

    ``partials`` is a non-empty sequence of ``(o (T, H, D), lse (H, T))``.
    """
    if len(partials) == 0:
        raise ValueError("merge_tree got no partials; pass at least one (out, lse) pair")
    level = list(partials)
    while len(level) > 1:
        merged = [merge(*level[i], *level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2 == 1:
            merged.append(level[-1])  # the odd one out rises to the next level unchanged
        level = merged
    o, lse = level[0]
    return o, lse.float()


def merge_stacked(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge P partials at once: ``o`` (P, T, H, D), ``lse`` (P, H, T) -> (T, H, D), (H, T).

    The same result as :func:`merge_tree`, in a fixed handful of kernels whatever P is: when all
    partials already sit on one GPU (the base after a decode exchange), the tree's rounds buy
    nothing and each round would cost its own kernel launches.
    """
    lse = lse.float()
    total = torch.logsumexp(lse, dim=0)  # (H, T); -inf where every part is empty
    anchor = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    w = torch.exp(lse - anchor).permute(0, 2, 1).unsqueeze(-1)  # (P, T, H, 1)
    return (w * o.float()).sum(dim=0).to(o.dtype), total


def causal_by_diagonal(
    attend: AttendFn, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Bottom-right-aligned causal attention built from square-only causal calls.

    Query row i sits at key position ``Tk - Tq + i``. Every key before ``Tk - Tq`` is visible to
    every row, so that prefix is one non-causal call; the last ``Tq`` keys form a square where
    the causal mask is the same under either alignment. The two halves merge exactly by LSE.
    This lets kernels whose causal mask is top-left aligned (PyTorch's fused ops) serve
    decode-with-history and the pool's query blocks.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D) with Tq <= Tk. Returns out (Tq, Hq, D), lse (Hq, Tq).
    """
    tq, tk = q.shape[0], k.shape[0]
    assert 0 < tq <= tk, (tq, tk)
    split = tk - tq
    if tq == 1:
        return attend(q, k, v, False, scale)  # one query row sees every key: no mask at all
    o_diag, lse_diag = attend(q, k[split:], v[split:], True, scale)
    if split == 0:
        return o_diag, lse_diag
    o_pre, lse_pre = attend(q, k[:split], v[:split], False, scale)
    return merge(o_pre, lse_pre, o_diag, lse_diag)
