"""The attention-kernel seam: one contract, several implementations (reference, sdpa, flash)."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from fapool.attention.paged import PagedPlan, gathered, gathered_rows, padded_decode
from fapool.attention.varlen import VarlenMeta

logger = logging.getLogger(__name__)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionKernel(ABC):
    """Single-sequence attention that also returns the log-sum-exp of the scores.

    Contract of :meth:`forward`:

    - q: (Tq, Hq, D); k, v: (Tk, Hkv, D) with ``Hq % Hkv == 0``. Grouped-query attention: query
      head h uses KV head ``h // (Hq // Hkv)``.
    - ``causal`` is bottom-right aligned (flash-attn's convention): query row i sits at key
      position ``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``; needs ``Tq <= Tk``.
    - ``scale`` defaults to ``1 / sqrt(D)``.
    - Returns ``out`` (Tq, Hq, D) in q's dtype and ``lse`` (Hq, Tq) float32, the natural log of
      the sum of ``exp(scale * q.k)`` over the visible keys.
    - ``Tk == 0`` gives ``out`` zeros and ``lse`` -inf (an empty KV shard).

    Subclasses implement :meth:`_forward` (inputs already validated, non-empty, scale resolved)
    and :meth:`unavailable_reason`.
    """

    name: ClassVar[str]
    # True where `paged_decode` reads the pages itself in one launch with tensor-only metadata, so
    # a whole decode step, attention included, can be captured in one CUDA graph.
    paged_in_graph: ClassVar[bool] = False

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attention of q against k, v; see the class docstring for the contract."""
        check_qkv(q, k, v, causal=causal)
        tq, hq, d = q.shape
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        if tq == 0 or k.shape[0] == 0:
            out = torch.zeros_like(q)
            lse = torch.full((hq, tq), -math.inf, dtype=torch.float32, device=q.device)
            return out, lse
        out, lse = self._forward(q, k, v, causal=causal, scale=scale)
        assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
        assert lse.shape == (hq, tq) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
        return out, lse

    def decode_varlen(
        self,
        q: Tensor,
        k_arena: Tensor,
        v_arena: Tensor,
        starts: Sequence[int],
        lengths: Sequence[int],
        scale: float | None = None,
        plan: VarlenMeta | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One query row per sequence against that sequence's rows of a shared KV arena.

        q: (B, Hq, D); k_arena, v_arena: (R, Hkv, D); sequence i sees rows
        ``[starts[i], starts[i] + lengths[i])`` unmasked (its own newest key is among them).
        Returns out (B, Hq, D) and lse (Hq, B). Here one :meth:`forward` per sequence; a kernel
        with a varlen op overrides it (``plan`` from :meth:`varlen_plan`, made once per step).
        """
        outs, lses = [], []
        for i, (s, n) in enumerate(zip(starts, lengths)):
            o, lse = self.forward(q[i : i + 1], k_arena[s : s + n], v_arena[s : s + n], causal=False, scale=scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)

    def decode_paged(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, plan: PagedPlan,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
        """One query row per sequence, q (B, Hq, D), over its pages of k_pages, v_pages
        (pages, page_size, Hkv, D). Returns out (B, Hq, D) and lse (Hq, B). Here: every
        sequence's rows gathered into one contiguous copy, then :meth:`decode_varlen` over it."""
        k, v, starts = gathered_rows(k_pages, v_pages, plan)
        return self.decode_varlen(q, k, v, starts, plan.lengths, scale, self.varlen_plan(
            starts, plan.lengths, k.shape[1], q.device))

    def paged_decode(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                     seq_lens: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
        """`decode_paged` from device tensors only (page_table (B, W) int32, seq_lens (B,) int32), so
        that it can be captured: a padded gather of every table row, in float32. Exact, but it
        reads W pages a row whatever the length; kernels that read pages themselves override it."""
        return padded_decode(q, k_pages, v_pages, page_table, seq_lens, scale)

    def prefill_paged(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, plan: PagedPlan,
                      scale: float | None = None) -> Tensor:
        """Queries of several sequences, q (T, Hq, D) flat: sequence i's `plan.q_lens[i]` queries
        are the last rows of its `plan.lengths[i]` rows (already cached), causal. Returns (T, Hq, D)."""
        return gathered(self.forward, q, k_pages, v_pages, plan, scale, causal=True)[0]

    def varlen_plan(self, starts: Sequence[int], lengths: Sequence[int], num_kv_heads: int,
                    device: torch.device) -> VarlenMeta | None:
        """Per-step metadata for :meth:`decode_varlen` (None: one call per sequence)."""
        return None

    @abstractmethod
    def _forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        """Kernel-specific body of :meth:`forward` for Tq >= 1, Tk >= 1."""

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this kernel cannot run on ``device``, or None when it can."""

    @classmethod
    def is_available(cls, device: torch.device | str) -> bool:
        """Whether this kernel can run on ``device`` (package importable, GPU new enough)."""
        return cls.unavailable_reason(torch.device(device)) is None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> None:
    """Raise ValueError unless q, k, v fit the :class:`AttentionKernel` contract."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"attention takes q (Tq, Hq, D) and k, v (Tk, Hkv, D); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: drop the batch dimension"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    tq, hq, d = q.shape
    tk, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"q has head dim {d} but k, v have {dk}; they must match")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of KV heads ({hkv}) "
            "for grouped-query attention"
        )
    if causal and tq > tk:
        raise ValueError(
            f"causal attention needs Tq <= Tk (bottom-right aligned); got Tq={tq}, Tk={tk}: "
            "pass the K, V of every earlier token as well"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")


def check_half(kernel_name: str, dtype: torch.dtype) -> None:
    """Raise ValueError for dtypes a flash kernel cannot take."""
    if dtype not in HALF_DTYPES:
        raise ValueError(
            f"kernel {kernel_name!r} takes float16 or bfloat16, got {dtype}: cast the inputs or "
            "use the 'sdpa' (CUDA) or 'reference' kernel for float32"
        )


def normalise_lse(lse: Tensor, num_heads: int, num_rows: int) -> Tensor:
    """Bring a fused op's LSE to (num_heads, num_rows) float32.

    Ops disagree on the shape: (B, H, Tq), (B, H, Tq, 1) (cuDNN) or (B, H, ceil32(Tq)) (the
    memory-efficient op pads rows to a multiple of 32). With B == 1 all of them flatten to
    (H, >= Tq) rows whose first Tq entries are ours.
    """
    flat = lse.reshape(num_heads, -1)
    assert flat.shape[1] >= num_rows, (tuple(lse.shape), num_heads, num_rows)
    return flat[:, :num_rows].float().contiguous()
