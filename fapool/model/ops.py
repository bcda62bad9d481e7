"""The elementwise chains of a decoder layer (RMSNorm, the residual add before it, rotary, SwiGLU's
product), eager or fused by `torch.compile`.

Eagerly each chain is several small kernels (RMSNorm alone: cast, square, mean, add, rsqrt, two
multiplies, cast); in a decode step of a few rows those launches, not bytes, set the pace. Compiled,
each chain is one generated kernel. The matmuls stay cuBLAS calls either way. One compiled function
serves every layer and every batch size (`dynamic=True`), so compiling costs the same for a 4-layer
model as for a 32-layer one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of casts as transformers' LlamaRMSNorm, so fp16/bf16 round identically.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding `delta`, and its norm."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    # q: (N, Hq, D), k: (N, Hkv, D), cos/sin: (N, 1, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class ElementwiseOps:
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]


EAGER = ElementwiseOps(rms_norm, add_rms_norm, rotary, silu_mul)
_compiled: ElementwiseOps | None = None


def fused(fn: Callable, dynamic: bool | None = True) -> Callable:
    """`fn` compiled into as few kernels as it can be, for every shape (one compile, not one per
    batch size); what every `torch_compile` path of the engine uses. `dynamic=None`: the first
    shape is compiled as it is, and only the sizes that then change (the token count) become
    symbolic, so the row length stays a constant the kernel's loads are vectorized by."""
    # Rounded where eager rounds (bf16 between ops), so compiled and eager steps agree.
    return torch.compile(fn, dynamic=dynamic, fullgraph=True, options={"emulate_precision_casts": True})


# Rows from which rotary and SwiGLU take the kernels compiled with the row length constant: on an
# H200 (paper model, prompts of new lengths, one engine each way, 2026-12-03) those were 3% faster
# at 4000 and 8000 tokens but 2% slower at 2000 and 8% at 1000 than the all-symbolic ones.
LARGE_ROWS = 2048


def by_rows(small: Callable, large: Callable) -> Callable:
    """`small` for calls of up to LARGE_ROWS rows (decodes, chunks of the default budget), else `large`."""
    def call(x: torch.Tensor, *rest):
        return (large if x.shape[0] > LARGE_ROWS else small)(x, *rest)
    return call


def compiled_ops() -> ElementwiseOps:
    """The same functions through torch.compile, made once per process (compiling is lazy: the
    first call of each, in the engine's warm-up, generates its kernel)."""
    global _compiled
    if _compiled is None:
        # Rotary and SwiGLU read strided views of the fused projections' output. With every size
        # symbolic (dynamic=True) their kernels ran 3-4x slower than vLLM's at a 16K-token prompt
        # on an H200 (bench.peer's profile: SwiGLU 36.5 vs 10.4 ms, rotary 23.6 vs 4.3 ms over
        # llama8b's 32 layers), but faster on short chunks (LARGE_ROWS). Elementwise only, so
        # they give the same bits however compiled.
        _compiled = ElementwiseOps(fused(rms_norm), fused(add_rms_norm),
                                   by_rows(fused(rotary), fused(rotary, dynamic=None)),
                                   by_rows(fused(silu_mul), fused(silu_mul, dynamic=None)))
    return _compiled
