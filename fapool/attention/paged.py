"""Attention over a paged KV cache: the step's plan, the fallback kernels, and KV splits.

A kernel that reads pages itself (flash-attn-4's `page_table`) overrides
`AttentionKernel.decode_paged` / `prefill_paged` and runs a whole batch in one launch. Every other
kernel gets the fallback here: gather each sequence's rows into a contiguous copy, then its
single-sequence `forward`. The fallback is exact and runs anywhere (the CPU tests), at the cost
of a copy and a launch chain per sequence.

Split KV: one long sequence in a small batch gives a paged kernel too few thread blocks to reach
the memory bandwidth (flash-attn-4 refuses `num_splits > 1` on Hopper). `split_table` cuts each
sequence's pages into `splits` chunks, each its own row of the kernel's batch, and
`merge_splits` combines the chunks by LSE: the pool's own math, inside one GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fapool.attention.merge import merge_stacked

# A kernel's single-sequence attention: (q, k, v, causal=, scale=) -> (out, lse).
Forward = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class PagedPlan:
    """Where a step's sequences live in the pages, made once per step for every layer.

    Sequence i has queries q[cu_q[i]:cu_q[i+1]] (one at decode) and sees its rows [0, lengths[i])
    through `page_table[i]`; its queries are the last rows of that range (bottom-right causal).
    """

    page_table: Tensor  # (B, W) int32 on the device
    seq_lens: Tensor  # (B,) int32 on the device
    lengths: tuple[int, ...]  # the same on the host
    q_lens: tuple[int, ...]
    cu_q: Tensor | None  # (B + 1,) int32 on the device; None at decode
    table: np.ndarray  # the page table on the host (fallback gathers)
    page_size: int

    @classmethod
    def build(cls, table: np.ndarray, lengths: list[int], q_lens: list[int], page_size: int,
              device: torch.device) -> "PagedPlan":
        lens = np.asarray(lengths, dtype=np.int32)
        decode = all(n == 1 for n in q_lens)
        cu = None if decode else np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        # One host-to-device copy for the table and the lengths (and the query offsets).
        flat = np.concatenate([table.reshape(-1), lens] + ([] if cu is None else [cu]))
        dev = torch.from_numpy(flat).to(device, non_blocking=True)
        n = table.size
        b = len(lengths)
        return cls(dev[:n].view(table.shape), dev[n : n + b], tuple(lengths), tuple(q_lens),
                   None if cu is None else dev[n + b :], table, page_size)


def _rows(plan: PagedPlan, i: int) -> np.ndarray:
    n = plan.lengths[i]
    pages = plan.table[i, : -(-n // plan.page_size)].astype(np.int64)
    return (pages[:, None] * plan.page_size + np.arange(plan.page_size)).reshape(-1)[:n]


def gathered(forward: Forward, q: Tensor, k_pages: Tensor, v_pages: Tensor, plan: PagedPlan,
             scale: float | None, causal: bool) -> tuple[Tensor, Tensor]:
    """The fallback: each sequence's rows copied out of the pages, then the kernel's `forward`."""
    k_flat, v_flat = k_pages.flatten(0, 1), v_pages.flatten(0, 1)
    outs, lses, lo = [], [], 0
    for i, nq in enumerate(plan.q_lens):
        idx = torch.from_numpy(_rows(plan, i)).to(q.device)
        o, lse = forward(q[lo : lo + nq], k_flat[idx], v_flat[idx], causal=causal, scale=scale)
        outs.append(o)
        lses.append(lse)
        lo += nq
    return torch.cat(outs), torch.cat(lses, dim=1)


def padded_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor, seq_lens: Tensor,
                  scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Decode over whole page-table rows with the rows past each length masked: static shapes and
    device metadata only. q (B, Hq, D) -> out (B, Hq, D), lse (Hq, B)."""
    b, hq, d = q.shape
    k = k_pages[page_table.long()].flatten(1, 2).float()  # (B, W * P, Hkv, D)
    v = v_pages[page_table.long()].flatten(1, 2).float()
    hkv = k.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bthd->bhgt", qg, k) * (scale or d**-0.5)
    t = torch.arange(k.shape[1], device=q.device)
    s = s.masked_fill((t[None, :] >= seq_lens[:, None]).view(b, 1, 1, -1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G)
    out = torch.einsum("bhgt,bthd->bhgd", torch.exp(s - lse[..., None]), v)
    return out.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq).transpose(0, 1).contiguous()


def gathered_rows(k_pages: Tensor, v_pages: Tensor, plan: PagedPlan) -> tuple[Tensor, Tensor, list[int]]:
    """Every sequence's rows copied out of the pages into one contiguous (R, Hkv, D) pair, with
    each sequence's first row: one index_select each for K and V, whatever the batch."""
    idx = np.concatenate([_rows(plan, i) for i in range(len(plan.lengths))])
    starts = np.concatenate([[0], np.cumsum(plan.lengths)[:-1]]).tolist()
    idx_t = torch.from_numpy(idx).to(k_pages.device, non_blocking=True)
    return k_pages.flatten(0, 1).index_select(0, idx_t), v_pages.flatten(0, 1).index_select(0, idx_t), starts


def split_table(table: np.ndarray, lengths: list[int], page_size: int, splits: int,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut each sequence's pages into `splits` chunks of whole pages: the page table (B * S, W')
    and the rows each chunk covers (B * S,), chunks of one sequence adjacent. Trailing chunks of a
    short sequence cover 0 rows."""
    b = len(lengths)
    lens = np.asarray(lengths, dtype=np.int64)
    pages = -(-lens // page_size)
    per = -(-pages // splits)  # pages per chunk, (B,)
    width = width or max(int(per.max(initial=1)), 1)
    first = np.arange(splits)[None, :] * per[:, None]  # (B, S) first page of each chunk
    idx = np.minimum(first[..., None] + np.arange(width)[None, None, :], table.shape[1] - 1)
    out = np.take_along_axis(table[:, None, :].repeat(splits, 1), idx, axis=2)  # (B, S, W')
    rows = np.clip(lens[:, None] - first * page_size, 0, per[:, None] * page_size)
    return out.reshape(b * splits, width).astype(np.int32), rows.reshape(-1).astype(np.int32)


def merge_splits(o: Tensor, lse: Tensor, rows: Tensor, splits: int) -> tuple[Tensor, Tensor]:
    """Merge chunk results: o (B * S, Hq, D), lse (Hq, B * S), rows (B * S,) -> (B, Hq, D), (Hq, B).
    Empty chunks count for nothing, whatever the kernel wrote for them."""
    bs, hq, d = o.shape
    b = bs // splits
    empty = (rows == 0).view(b, splits)
    o = o.view(b, splits, hq, d).masked_fill(empty[..., None, None], 0.0).transpose(0, 1)
    lse = lse.view(hq, b, splits).masked_fill(empty[None], float("-inf")).permute(2, 0, 1)
    return merge_stacked(o, lse)
