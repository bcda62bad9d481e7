"""The typed per-step plan of a varlen decode over one KV arena (`AttentionKernel.varlen_plan`).

Its own module so that the kernel seam (`base.py`) can name it without importing a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VarlenMeta:
    """Where a decode batch's regions are, for the varlen flash op: sequences sorted by region
    start (the op needs increasing offsets), as device tensors made once per step."""

    base: int  # the first region's start: keys are passed from there
    span: int  # rows from base to the end of the last region used
    max_len: int
    cu_q: Tensor  # (B + 1,) int32
    cu_k: Tensor  # (B + 1,) int32, region starts relative to base
    used: Tensor  # (B,) int32 filled rows per region
    order: Tensor  # (B,) int64 batch index of each sorted position
    inverse: Tensor  # (B,) int64 sorted position of each batch index

    @classmethod
    def build(cls, starts, lengths, device: torch.device) -> "VarlenMeta":
        b = len(starts)
        order = sorted(range(b), key=lambda i: starts[i])
        base, last = starts[order[0]], order[-1]
        cu_k = [starts[i] - base for i in order] + [starts[last] - base + lengths[last]]
        inverse = [0] * b
        for pos, i in enumerate(order):
            inverse[i] = pos
        ints = torch.tensor([*range(b + 1), *cu_k, *(lengths[i] for i in order)], dtype=torch.int32)
        longs = torch.tensor([*order, *inverse], dtype=torch.int64)
        ints, longs = ints.to(device), longs.to(device)
        return cls(base, cu_k[-1], max(lengths), ints[: b + 1], ints[b + 1 : 2 * b + 2], ints[2 * b + 2 :],
                   longs[:b], longs[b:])
