"""Split-KV decode attention over regions of a KV arena, in Triton ("flash-decoding").

Why by hand: a decode batch is one query row per sequence against that sequence's region of the
arena (start, filled length). No kernel we can install does that with the LSE and with long KV
split across thread blocks on Hopper: PyTorch's varlen flash op gives each (sequence, KV head)
one block (a batch of 8 x 32 heads half-fills an H200), its per-sequence ops cost a launch chain
each, and flash-attn-4 refuses ``num_splits > 1`` on SM 9.0. Here each (sequence, KV head, KV
chunk) is one program that reads its keys and values once; a second kernel merges the chunks by
LSE. One launch pair per layer, whatever the batch, the lengths or the grouping of heads.

Exactness: every key is read once by exactly one chunk and chunks merge by the same LSE algebra
as the pool (``merge.py``); GPU tests compare it with the reference kernel in fp32 and bf16.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from fapool.attention.merge import merge_stacked

try:  # Triton ships with PyTorch's CUDA builds; CPU builds and other platforms go without.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None

BLOCK_N = 64  # keys per inner iteration
MIN_CHUNK = 256  # keys per program at least: fewer would spend more on merging than reading


ENV_VAR = "FAPOOL_TRITON_DECODE"
_disabled: list[str] = []  # why it failed at run time (compiler or driver), once


def triton_decode_reason(device: torch.device) -> str | None:
    """Why the Triton decode kernel will not run on ``device``, or None when it will.

    Opt-in (``FAPOOL_TRITON_DECODE=1``) until a GPU benchmark has measured it against the fused
    ops it replaces: its logic is tested in Triton's interpreter, not yet its compiled speed.
    """
    if os.environ.get(ENV_VAR, "0").strip() != "1":
        return f"off (set {ENV_VAR}=1 to use it)"
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA device, got {device}"
    return _disabled[0] if _disabled else None


def disable(reason: str) -> None:
    """Stop using the kernel in this process (it failed to compile or launch here)."""
    _disabled[:] = [reason]


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class SplitPlan:
    """A decode batch's regions as device tensors plus the chunking, made once per step."""

    starts: Tensor  # (B,) int64
    lengths: Tensor  # (B,) int32
    max_len: int
    chunk: int  # keys per program, a multiple of BLOCK_N
    splits: int  # chunks of the longest sequence

    @classmethod
    def build(cls, starts, lengths, num_kv_heads: int, device: torch.device,
              target_programs: int | None = None) -> SplitPlan:
        b, max_len = len(starts), max(lengths)
        if target_programs is None:
            sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
                if device.type == "cuda" else 132
            target_programs = 4 * sms  # a few waves, so uneven chunks even out
        splits = max(1, min(-(-max_len // MIN_CHUNK), -(-target_programs // (b * num_kv_heads))))
        chunk = -(-max_len // splits)
        chunk = -(-chunk // BLOCK_N) * BLOCK_N
        splits = -(-max_len // chunk)
        host = torch.tensor([*starts, *lengths], dtype=torch.int64)
        dev = host.to(device)
        return cls(dev[:b], dev[b:].to(torch.int32), max_len, chunk, splits)


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, STARTS, LENGTHS, O_PART, L_PART,
        stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
        stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
        scale_log2, chunk,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        start = tl.load(STARTS + b)
        length = tl.load(LENGTHS + b)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, length)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
        qf = q.to(tl.float32) * scale_log2  # base-2 softmax: exp2 is the fast path
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            rows = start + offs_n
            k = tl.load(K + rows[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(V + rows[:, None] * stride_vr + kvh * stride_vh + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            if USE_DOT:
                if IEEE:
                    sc = tl.dot(qf, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:  # q as stored, scaled after the fp32 accumulate (rounding it scaled would add error)
                    sc = tl.dot(q, tl.trans(k)) * scale_log2
            else:
                sc = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            sc = tl.where(n_mask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                if IEEE:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        # An empty chunk (past a short sequence's end) leaves l == 0: out 0, lse -inf.
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptr = O_PART + b * stride_ob + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, out, mask=g_mask[:, None])
        tl.store(L_PART + b * stride_lb + s * stride_ls + heads, lse, mask=g_mask)

    @triton.jit
    def _merge_kernel(
        O_PART, L_PART, OUT, LSE, num_splits,
        stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
        stride_outb, stride_outh, stride_lse_h,
        BLOCK_S: tl.constexpr, D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        s_mask = offs_s < num_splits
        lse = tl.load(L_PART + b * stride_lb + offs_s * stride_ls + h * stride_lh, mask=s_mask, other=float("-inf"))
        top = tl.max(lse, axis=0)
        finite = top > float("-inf")
        w = tl.exp(lse - tl.where(finite, top, 0.0))  # masked and empty chunks: exp(-inf) = 0
        denom = tl.sum(w, axis=0)
        o = tl.load(O_PART + b * stride_ob + offs_s[:, None] * stride_os + h * stride_oh + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(finite, denom, 1.0)
        tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty))
        tl.store(LSE + h * stride_lse_h + b, tl.where(finite, top + tl.log(tl.where(finite, denom, 1.0)), float("-inf")))


def decode_split_kv(q: Tensor, k_arena: Tensor, v_arena: Tensor, plan: SplitPlan, scale: float) -> tuple[Tensor, Tensor]:
    """q (B, Hq, D) against each sequence's region of k_arena, v_arena (R, Hkv, D).
    Returns out (B, Hq, D) in q's dtype and lse (Hq, B) float32."""
    b, hq, d = q.shape
    hkv = k_arena.shape[1]
    group = hq // hkv
    assert k_arena.stride(2) == 1 and v_arena.stride(2) == 1 and d & (d - 1) == 0, "rows of (Hkv, D), D a power of 2"
    q = q.contiguous()
    o_part = torch.empty(b, plan.splits, hq, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b, plan.splits, hq, dtype=torch.float32, device=q.device)
    use_dot = group > 1
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else 1
    _partial_kernel[(b, hkv, plan.splits)](
        q, k_arena, v_arena, plan.starts, plan.lengths, o_part, l_part,
        q.stride(0), q.stride(1), k_arena.stride(0), k_arena.stride(1), v_arena.stride(0), v_arena.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
        scale * 1.4426950408889634, plan.chunk,
        GROUP=group, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=d, USE_DOT=use_dot, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=3,
    )
    return _merge(o_part, l_part.transpose(1, 2), q.dtype)


def _merge(o_part: Tensor, l_part: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """o_part (B, S, Hq, D), l_part (B, Hq, S) (any strides) -> out (B, Hq, D), lse (Hq, B)."""
    b, splits, hq, d = o_part.shape
    out = torch.empty(b, hq, d, dtype=dtype, device=o_part.device)
    lse = torch.empty(hq, b, dtype=torch.float32, device=o_part.device)
    _merge_kernel[(b, hq)](
        o_part, l_part, out, lse, splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(2), l_part.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        BLOCK_S=triton.next_power_of_2(splits), D=d, num_warps=4,
    )
    return out, lse


def merge_partials(outs: Tensor, lses: Tensor) -> Tensor:
    """Merge P partial results by LSE: outs (P, M, Hq, D), lses (P, Hq, M) -> (M, Hq, D) in
    outs' dtype. One launch on CUDA with Triton; the same algebra in torch ops elsewhere."""
    if triton_decode_reason(outs.device) is None:
        return _merge(outs.transpose(0, 1), lses.permute(2, 1, 0), outs.dtype)[0]
    return merge_stacked(outs, lses)[0]
