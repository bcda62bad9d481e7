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
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from fapool.attention.merge import merge_stacked


def _kernels():
    """The compiled-on-demand kernels (Triton ships with PyTorch's CUDA builds)."""
    from fapool.attention import triton_kernels

    return triton_kernels


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA device, got {device}"
    return _disabled[0] if _disabled else None


def disable(reason: str) -> None:
    """Stop using the kernel in this process (it failed to compile or launch here)."""
    _disabled[:] = [reason]


def reenable() -> None:
    """Undo :func:`disable` (the benchmark measures the fallback, then the kernel again)."""
    _disabled.clear()


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class SplitPlan:
    """A decode batch's regions as device tensors plus the chunking, made once per step."""

    starts: Tensor  # (B,) int64
    lengths: Tensor  # (B,) int64
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
        return cls(dev[:b], dev[b:], max_len, chunk, splits)


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
    block_g = max(16, _pow2(group)) if use_dot else 1
    _kernels().partial_kernel[(b, hkv, plan.splits)](
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
    _kernels().merge_kernel[(b, hq)](
        o_part, l_part, out, lse, splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(2), l_part.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        BLOCK_S=_pow2(splits), D=d, num_warps=4,
    )
    return out, lse


def merge_partials(outs: Tensor, lses: Tensor) -> Tensor:
    """Merge P partial results by LSE: outs (P, M, Hq, D), lses (P, Hq, M) -> (M, Hq, D) in
    outs' dtype. One launch on CUDA with Triton; the same algebra in torch ops elsewhere."""
    if triton_decode_reason(outs.device) is None:
        return _merge(outs.transpose(0, 1), lses.permute(2, 1, 0), outs.dtype)[0]
    return merge_stacked(outs, lses)[0]
