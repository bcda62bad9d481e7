"""Plain-PyTorch attention: exact, device-agnostic, the kernel used on CPU."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fapool.attention.base import AttentionKernel

# Elements of one score block (256 MiB of float32); long prompts are processed in row chunks.
SCORE_BUDGET_ELEMENTS = (256 << 20) // 4


class ReferenceKernel(AttentionKernel):
    """Softmax(QK^T)V in float32 (float64 for float64 inputs) on any device.

    Query heads are grouped per KV head as (Hkv, group * Tq, D), so K and V are never repeated.
    Query rows are processed in chunks that keep the score block under ~256 MiB, and a causal
    chunk only touches the keys its last row can see.
    """

    name = "reference"

    def __init__(self, score_budget_elements: int = SCORE_BUDGET_ELEMENTS) -> None:
        assert score_budget_elements > 0
        self.score_budget_elements = score_budget_elements

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        return None

    def _forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        tq, hq, d = q.shape
        tk, hkv, _ = k.shape
        group = hq // hkv
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        k_t = k.to(compute).permute(1, 2, 0)  # (Hkv, D, Tk)
        v_h = v.to(compute).transpose(0, 1)  # (Hkv, Tk, D)
        out = torch.empty_like(q)
        lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
        offset = tk - tq  # key position of query row 0 under the bottom-right rule
        rows_per_chunk = max(1, self.score_budget_elements // (hq * tk))
        for start in range(0, tq, rows_per_chunk):
            end = min(start + rows_per_chunk, tq)
            rows = end - start
            keys = offset + end if causal else tk  # later keys are masked for every row here
            q_c = q[start:end].to(compute) * scale  # (Tc, Hq, D)
            q_c = q_c.reshape(rows, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * rows, d)
            scores = torch.matmul(q_c, k_t[:, :, :keys])  # (Hkv, G*Tc, Tk')
            if causal:
                pos = torch.arange(start + offset, end + offset, device=q.device)  # (Tc,)
                hidden = torch.arange(keys, device=q.device)[None, :] > pos[:, None]  # (Tc, Tk')
                scores = scores.view(hkv, group, rows, keys).masked_fill_(hidden, -math.inf)
                scores = scores.view(hkv, group * rows, keys)
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (Hkv, G*Tc, 1)
            probs = torch.exp_(scores.sub_(row_lse))
            o_c = torch.matmul(probs, v_h[:, :keys])  # (Hkv, G*Tc, D)
            out[start:end] = o_c.view(hkv, group, rows, d).permute(2, 0, 1, 3).reshape(rows, hq, d)
            lse[:, start:end] = row_lse.view(hq, rows)
        return out, lse
