"""The 'sdpa' kernel: PyTorch's fused CUDA attention ops behind the kernel seam.

Which op is fastest depends on the shape of the work (measured on H200, bf16, D=128, Hq=32,
Hkv=8): cuDNN leads on prefill (~590 TFLOP/s causal at 16K) but runs one decode token on only
Hkv thread blocks (0.35 TB/s over 64K keys), while PyTorch's flash op splits long KV itself
(3.2 TB/s at 64K, 4.1 at 512K). So decode-shaped work (few query rows over long KV) tries the
flash op first and everything else tries cuDNN first; the memory-efficient op is the fallback
and the only one that takes float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from fapool.attention.base import HALF_DTYPES, AttentionKernel
from fapool.attention.merge import causal_by_diagonal
from fapool.attention.sdpa_ops import (
    FusedOpSpec,
    cudnn_op,
    efficient_op,
    flash_op,
    fused_attend,
    kv_splits_for,
    varlen_decode,
)
from fapool.attention.varlen import VarlenMeta

logger = logging.getLogger(__name__)

CUDA_OPS = (
    FusedOpSpec("cudnn", cudnn_op),
    FusedOpSpec("flash", flash_op, splits_kv=True),
    FusedOpSpec("efficient", efficient_op),
)
CUDA_DECODE_OPS = (CUDA_OPS[1], CUDA_OPS[0], CUDA_OPS[2])
DECODE_ROWS = 16  # unmasked calls with this few query rows are decode-shaped


class SdpaCudnnKernel(AttentionKernel):
    """PyTorch's fused CUDA attention with an op fallback chain.

    ``ops`` is the chain for most work and ``decode_ops`` the chain for decode-shaped work:
    unmasked attention whose rows would launch fewer than ``target_blocks`` thread blocks over
    at least ``2 * min_split_keys`` keys. For ops that do not split KV themselves such work is
    cut into KV chunks run in parallel and merged by LSE (:func:`kv_splits_for`).

    The first op that accepts a (dtype, head dim, causal, decode-shaped) combination is
    remembered, so a refusal (cuDNN and flash refuse float32) costs one failed call, not one
    per step. Tests pass CPU ops (``sdpa_ops.cpu_flash_op``) to run all of this logic on CPU.
    """

    name = "sdpa"

    def __init__(
        self,
        ops: Sequence[FusedOpSpec] | None = None,
        decode_ops: Sequence[FusedOpSpec] | None = None,
        *,
        min_split_keys: int = 2048,
        target_blocks: int = 264,  # two waves over the 132 SMs of an H100 or H200
    ) -> None:
        self.ops = tuple(ops) if ops is not None else CUDA_OPS
        if decode_ops is None:
            decode_ops = CUDA_DECODE_OPS if ops is None else self.ops
        self.decode_ops = tuple(decode_ops)
        if not self.ops or not self.decode_ops:
            raise ValueError("SdpaCudnnKernel got an empty op chain; pass FusedOpSpecs or None")
        if min_split_keys < 1 or target_blocks < 1:
            raise ValueError(
                f"min_split_keys={min_split_keys} and target_blocks={target_blocks} must be >= 1"
            )
        self.min_split_keys = min_split_keys
        self.target_blocks = target_blocks
        self._first_accepting: dict[tuple[torch.dtype, int, bool, bool], int] = {}
        self._varlen_ok = True  # False once the varlen flash op refused (older torch builds)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"needs a CUDA device, got {device}"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None

    def op_for(
        self, dtype: torch.dtype, head_dim: int, causal: bool, decode: bool = False
    ) -> str | None:
        """Name of the op remembered for this combination, or None before the first call."""
        index = self._first_accepting.get((dtype, head_dim, causal, decode))
        chain = self.decode_ops if decode else self.ops
        return None if index is None else chain[index].name

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        splits = 1
        if not causal:
            rows = q.shape[0] * (q.shape[1] // k.shape[1])  # query rows stacked per KV head
            splits = kv_splits_for(
                k.shape[0], k.shape[1], rows, self.min_split_keys, self.target_blocks
            )
        # Decode-shaped work takes the flash op even unsplit: cuDNN builds an execution plan per
        # new KV length, which a decode step changes every time (about 40 ms a step, measured).
        decode = splits > 1 or (not causal and q.shape[0] <= DECODE_ROWS)
        chain = self.decode_ops if decode else self.ops
        key = (q.dtype, q.shape[-1], causal, decode)
        start = self._first_accepting.get(key, 0)
        refusals = []
        for index in range(start, len(chain)):
            spec = chain[index]
            try:
                result = fused_attend(
                    spec.fn, q, k, v, causal, scale, 1 if spec.splits_kv else splits
                )
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # the op refused these inputs (dtype, head dim, build)
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                refusals.append(f"{spec.name}: {first_line}")
                continue
            if key not in self._first_accepting or index != start:
                if refusals:
                    logger.info("sdpa uses %s for %s; refused: %s", spec.name, key, refusals)
                self._first_accepting[key] = index
            return result
        raise RuntimeError(
            f"no fused attention op accepted dtype={q.dtype}, head_dim={q.shape[-1]}, "
            f"causal={causal}: {'; '.join(refusals)}. Use the 'reference' kernel instead"
        )

    def varlen_plan(self, starts: Sequence[int], lengths: Sequence[int], num_kv_heads: int,
                    device: torch.device) -> VarlenMeta | None:
        """Device-side metadata for :meth:`decode_varlen`, built once per step (building it per
        layer would synchronise the host with the GPU four times a step): the varlen flash op's."""
        if (not self._varlen_ok or device.type != "cuda" or len(starts) < 2 or min(lengths) < 1
                or self._split_beats_varlen(num_kv_heads, lengths)):
            return None
        return VarlenMeta.build(starts, lengths, device)

    def decode_varlen(
        self, q: Tensor, k_arena: Tensor, v_arena: Tensor, starts: Sequence[int], lengths: Sequence[int],
        scale: float | None = None, plan: VarlenMeta | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The whole decode batch in one varlen flash call (``seqused_k`` marks how much of each
        region is filled), else one chain per sequence."""
        if plan is None and q.is_cuda:
            plan = self.varlen_plan(starts, lengths, k_arena.shape[1], q.device)
        if plan is None or q.dtype not in HALF_DTYPES or not self._varlen_ok:
            return super().decode_varlen(q, k_arena, v_arena, starts, lengths, scale)
        try:
            return varlen_decode(q, k_arena, v_arena, plan, scale or q.shape[-1] ** -0.5)
        except (RuntimeError, TypeError) as exc:
            logger.warning("varlen flash decode unavailable (%s); one call per sequence instead", exc)
            self._varlen_ok = False
            return super().decode_varlen(q, k_arena, v_arena, starts, lengths, scale)

    def _split_beats_varlen(self, num_kv_heads: int, lengths: Sequence[int]) -> bool:
        """The varlen op gives each (sequence, KV head) one thread block and does not split long
        KV, so a small batch of long sequences leaves the GPU half idle (measured on H100: 64K x 8
        ran at 0.75 of the per-sequence flash op, which splits KV itself). Long and few: loop."""
        return len(lengths) * num_kv_heads < self.target_blocks and max(lengths) >= 4 * self.min_split_keys

    def _forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        if not causal:
            return self._attend(q, k, v, False, scale)
        return causal_by_diagonal(self._attend, q, k, v, scale)
