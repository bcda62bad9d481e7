"""PyTorch's fused attention ops and the layout work around them.

The private ``aten._scaled_dot_product_*_attention`` ops are used rather than
``F.scaled_dot_product_attention`` because only they return the log-sum-exp, which the pool
needs to merge partial results. Their schemas (``torch.ops.aten.<op>.default._schema``, torch
2.13 here; the same on the 2.11 CUDA build used for GPU checks):

- ``_scaled_dot_product_cudnn_attention(query, key, value, attn_bias, compute_log_sumexp,
  dropout_p=0., is_causal=False, return_debug_mask=False, *, scale=None)``
  -> (output, logsumexp (B, H, Tq, 1), cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, ...)
- ``_scaled_dot_product_flash_attention(query, key, value, dropout_p=0., is_causal=False,
  return_debug_mask=False, *, scale=None)`` -> (output, logsumexp (B, H, Tq), ...); fp16/bf16
- ``_scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp,
  dropout_p=0., is_causal=False, *, scale=None)`` -> (output, logsumexp (B, H, ceil32(Tq)), ...)
- ``_scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p=0.,
  is_causal=False, *, attn_mask=None, scale=None)`` -> (output, logsumexp)

All take (B, H, T, D), return a natural-log LSE (checked against float64 on H100/H200), and
align ``is_causal`` TOP-LEFT, so causal work is only ever asked of them on square problems.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fapool.attention.base import HALF_DTYPES, normalise_lse
from fapool.attention.merge import merge
from fapool.attention.varlen import VarlenMeta

# op(q, k, v, is_causal, scale) on (B, H, T, D) tensors -> (out (B, H, Tq, D), raw logsumexp).
FusedOp = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]


def _refuse_unless_half(op_name: str, dtype: torch.dtype) -> None:
    # Seen on H100, torch 2.11+cu130, cuDNN 9.19: the cuDNN op ACCEPTS float32 and returns NaN, so
    # the dtype is checked here instead of trusting the op to refuse.
    if dtype not in HALF_DTYPES:
        raise RuntimeError(f"{op_name} attention takes float16 or bfloat16, not {dtype}")


def cudnn_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """cuDNN fused attention (fp16/bf16): the fastest measured for prefill."""
    _refuse_unless_half("cuDNN", q.dtype)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]


def flash_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """PyTorch's bundled FlashAttention-2 op (fp16/bf16)."""
    _refuse_unless_half("flash", q.dtype)
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]


def efficient_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """Memory-efficient attention; the one fused op that also takes float32."""
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return res[0], res[1]


def cpu_flash_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """PyTorch's CPU flash op: same layout and top-left mask, so the CUDA path's logic runs in
    CPU tests unchanged."""
    res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None, scale=scale
    )
    return res[0], res[1]


@dataclass(frozen=True)
class FusedOpSpec:
    """One fused op in a kernel's fallback chain."""

    name: str
    fn: FusedOp
    # True when the op already cuts long KV into parallel chunks itself (PyTorch's flash op
    # does, for few query rows), so fused_attend must not split it again.
    splits_kv: bool = False


def kv_splits_for(tk: int, hkv: int, rows: int, min_split_keys: int, target_blocks: int) -> int:
    """How many KV chunks to run side by side for ``rows`` unmasked query rows per KV head.

    The fused ops parallelise over (batch, head, 128-row tiles) only, so one decode token over a
    long KV cache runs on Hkv thread blocks and leaves most SMs idle (0.35 TB/s measured on
    H100 for 64K keys, 8 KV heads). Splitting the keys into chunks along the batch dimension
    and merging by LSE ("flash-decoding") fills the GPU.
    """
    blocks = hkv * -(-rows // 128)
    return max(1, min(tk // min_split_keys, target_blocks // blocks))


def _unmasked(
    op: FusedOp, q4: Tensor, k: Tensor, v: Tensor, scale: float, splits: int
) -> tuple[Tensor, Tensor]:
    """Non-causal op call(s) for q4 (1, Hkv, R, D) against k, v (Tk, Hkv, D), KV cut into
    ``splits`` batch entries. Returns out (1, Hkv, R, D) in q4's dtype, lse (Hkv, R) float32."""
    _, hkv, rows, d = q4.shape
    tk = k.shape[0]
    if splits <= 1:
        out4, lse_raw = op(q4, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                           False, scale)
        return out4, normalise_lse(lse_raw, hkv, rows)
    length = tk // splits
    main = length * splits
    k_c = k[:main].unflatten(0, (splits, length)).transpose(1, 2)  # (C, Hkv, L, D), a view
    v_c = v[:main].unflatten(0, (splits, length)).transpose(1, 2)
    q_c = q4.expand(splits, -1, -1, -1).contiguous()  # (C, Hkv, R, D); small next to K, V
    out_c, lse_raw = op(q_c, k_c, v_c, False, scale)  # (C, Hkv, R, D)
    lse_c = normalise_lse(lse_raw, splits * hkv, rows).view(splits, hkv, rows)
    lse = torch.logsumexp(lse_c, dim=0)  # (Hkv, R); every chunk has keys, so finite
    weights = torch.exp(lse_c - lse).unsqueeze(-1)  # (C, Hkv, R, 1)
    out = (weights * out_c.float()).sum(dim=0)  # (Hkv, R, D)
    if main < tk:  # the remainder keys, fewer than one chunk
        out_t, lse_t = _unmasked(op, q4, k[main:], v[main:], scale, 1)
        merged, lse = merge(out.transpose(0, 1), lse, out_t[0].transpose(0, 1), lse_t)
        out = merged.transpose(0, 1)
    return out.to(q4.dtype).unsqueeze(0), lse


def fused_attend(
    op: FusedOp, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, splits: int = 1
) -> tuple[Tensor, Tensor]:
    """One fused-op call on our layout: q (Tq, Hq, D), k, v (Tk, Hkv, D) -> out (Tq, Hq, D),
    lse (Hq, Tq). ``causal`` uses the op's top-left mask, so it requires Tq == Tk; ``splits``
    cuts the keys of non-causal work into that many chunks run in parallel."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    if not causal:
        # Unmasked rows are independent, so each KV head's query group stacks into one longer
        # query sequence: GQA without repeating K and V (decode reads the KV cache once).
        q4 = q.reshape(tq, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * tq, d)
        out4, lse = _unmasked(op, q4, k, v, scale, splits)  # (1, Hkv, G*Tq, D), (Hkv, G*Tq)
        out = out4.reshape(hkv, group, tq, d).permute(2, 0, 1, 3).reshape(tq, hq, d)
        return out.to(q.dtype), lse.reshape(hq, tq)
    assert tq == tk, "top-left causal ops only agree with our mask on square problems"
    k4 = k.transpose(0, 1).unsqueeze(0)  # (1, Hkv, Tk, D), a view
    v4 = v.transpose(0, 1).unsqueeze(0)
    if group > 1:
        # A causal mask depends on the row index, so groups cannot be stacked; the square
        # diagonal is compute-bound and small next to the prefix, so repeating it is cheap.
        k4 = k4.repeat_interleave(group, dim=1)  # (1, Hq, Tk, D)
        v4 = v4.repeat_interleave(group, dim=1)
    q4 = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, Tq, D)
    out4, lse_raw = op(q4, k4, v4, True, scale)
    out = out4[0].transpose(0, 1)  # (Tq, Hq, D)
    return out.to(q.dtype), normalise_lse(lse_raw, hq, tq)


def varlen_decode(q: Tensor, k_arena: Tensor, v_arena: Tensor, meta: VarlenMeta, scale: float) -> tuple[Tensor, Tensor]:
    """``aten._flash_attention_forward`` in varlen mode over regions of one KV arena.

    Sequence i's keys start at ``cu_seqlens_k[i]`` and ``seqused_k[i]`` of them are filled, so
    regions need not be packed. q: (B, Hq, D), arenas (R, Hkv, D). Returns out (B, Hq, D),
    lse (Hq, B) float32.
    """
    b, hq, _ = q.shape
    k = k_arena[meta.base : meta.base + meta.span]
    v = v_arena[meta.base : meta.base + meta.span]
    out, lse = torch.ops.aten._flash_attention_forward(
        q.index_select(0, meta.order), k, v, meta.cu_q, meta.cu_k, 1, meta.max_len, 0.0, False, False,
        scale=scale, seqused_k=meta.used,
    )[:2]
    lse = lse.reshape(hq, b) if lse.shape[0] == hq else lse.reshape(b, hq).transpose(0, 1)
    return out.index_select(0, meta.inverse), lse.float().index_select(1, meta.inverse).contiguous()
