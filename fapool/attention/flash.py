"""FlashAttention kernels from Dao-AILab's packages, imported lazily so CPU hosts never load them.

Both take (B, T, H, D) fp16/bf16 tensors, handle GQA natively (query head h uses KV head
h // (Hq // Hkv)) and align the causal mask bottom-right, which is our contract as is.

- flash-attn-4, ``flash_attn.cute.interface.flash_attn_func(q, k, v, softmax_scale=None,
  causal=False, ..., return_lse=False)`` returns ``(out, lse)`` with lse (B, H, Tq) float32
  (``lse`` is None unless ``return_lse`` or a grad is needed). Hopper and Blackwell only.
- flash-attn 2.x, ``flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None,
  causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
  return_attn_probs=False)`` returns ``(out, softmax_lse (B, H, Tq), S_dmask)`` when
  ``return_attn_probs``; bottom-right causal since 2.1. Ampere and newer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from fapool.attention.base import AttentionKernel, check_half, normalise_lse
from fapool.attention.paged import PagedPlan


@lru_cache(maxsize=None)
def _import_attr(module: str, attr: str) -> tuple[Callable[..., Any] | None, str | None]:
    """(function, None) if ``module.attr`` imports, else (None, why not); cached because a
    failing import of a CUDA package is slow and its answer does not change in a process."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as exc:  # noqa: BLE001 - broken installs raise anything, all mean "absent"
        return None, f"cannot import {module}.{attr} ({type(exc).__name__}: {exc})"


def _cuda_reason(device: torch.device, min_major: int) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability(device)
    if major < min_major:
        return f"needs compute capability >= {min_major}.0, the GPU has {major}.{minor}"
    return None


class _FlashKernel(AttentionKernel):
    """What both packages share: a lazy import, a minimum GPU generation, half precision only.
    A subclass names its package and makes the call in `_run`."""

    module: str
    function: str
    pip_name: str
    min_major: int  # compute capability

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        reason = _cuda_reason(device, min_major=cls.min_major)
        return reason or _import_attr(cls.module, cls.function)[1]

    @classmethod
    def _imported(cls, function: str | None = None) -> Callable[..., Any]:
        fn, why = _import_attr(cls.module, function or cls.function)
        if fn is None:
            raise ValueError(f"kernel {cls.name!r} is not installed: {why}; pip install {cls.pip_name}")
        return fn

    def _forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        check_half(self.name, q.dtype)
        fn = self._imported()
        tq, hq, _ = q.shape
        out, lse = self._run(fn, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, scale)
        return out[0], normalise_lse(lse, hq, tq)

    @staticmethod
    def _run(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, causal: bool,
             scale: float) -> tuple[Tensor, Tensor]:
        """(B, T, H, D) inputs -> out (B, Tq, Hq, D), lse (B, Hq, Tq)."""
        raise NotImplementedError


class FlashAttn4Kernel(_FlashKernel):
    """flash-attn-4 (CuTe DSL): the fastest kernel on Hopper and Blackwell.

    Over a paged cache, `flash_attn_varlen_func(q, k_pages, v_pages, seqused_k=, page_table=,
    return_lse=True)` runs a whole batch, any mix of lengths, in one launch; its metadata is
    tensors only, so it replays inside a CUDA graph with new lengths (measured on H200).
    """

    name = "flash4"
    module, function, pip_name, min_major = "flash_attn.cute", "flash_attn_func", "flash-attn-4", 9
    paged_in_graph = True

    @classmethod
    def _varlen(cls) -> Callable[..., Any]:
        return cls._imported("flash_attn_varlen_func")

    def paged_decode(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                     seq_lens: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
        """q (B, Hq, D), page_table (B, W) int32, seq_lens (B,) int32 -> out (B, Hq, D), lse (Hq, B)."""
        out, lse = self._varlen()(q.unsqueeze(1), k_pages, v_pages, seqused_k=seq_lens, page_table=page_table,
                                  softmax_scale=scale, causal=False, return_lse=True)
        return out[:, 0], lse[:, :, 0].transpose(0, 1)

    def decode_paged(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, plan: PagedPlan,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
        return self.paged_decode(q, k_pages, v_pages, plan.page_table, plan.seq_lens, scale)

    def prefill_paged(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, plan: PagedPlan,
                      scale: float | None = None) -> Tensor:
        if plan.cu_q is None:  # one query a sequence: the decode launch
            return self.decode_paged(q, k_pages, v_pages, plan, scale)[0]
        out, _ = self._varlen()(q, k_pages, v_pages, cu_seqlens_q=plan.cu_q, seqused_k=plan.seq_lens,
                                page_table=plan.page_table, max_seqlen_q=max(plan.q_lens),
                                softmax_scale=scale, causal=True, return_lse=True)
        return out

    @staticmethod
    def _run(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, causal: bool,
             scale: float) -> tuple[Tensor, Tensor]:
        out, lse = fn(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
        if lse is None:
            raise RuntimeError("flash_attn.cute.flash_attn_func returned no LSE (return_lse=True)")
        return out, lse


class FlashAttn2Kernel(_FlashKernel):
    """flash-attn 2.x: the fast path on Ampere (A100)."""

    name = "flash2"
    module, function, pip_name, min_major = "flash_attn", "flash_attn_func", "flash-attn", 8

    @staticmethod
    def _run(fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, causal: bool,
             scale: float) -> tuple[Tensor, Tensor]:
        out, lse, _ = fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse
