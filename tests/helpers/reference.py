"""An independent reference for the engine's numbers: one whole-sequence forward of the model with
plain causal attention (no KV cache, no pages, no chunks), and the logit processors written out
from their definitions, one token at a time."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class WholeSequence:
    """Causal attention over one sequence's tokens, all in one pass."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]  # GQA: each KV head serves `rep` query heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                           v.transpose(0, 1).float(), is_causal=True)
        return o.transpose(0, 1).to(q.dtype)  # (N, Hq, D)


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float32: row p is the distribution of the token after ids[: p + 1]."""
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), WholeSequence())
    return model.logits(hidden).float()


def penalized(logits: torch.Tensor, prompt: list[int], output: list[int], *, presence: float = 0.0,
              frequency: float = 0.0, repetition: float = 1.0, bias: dict[int, float] | None = None,
              min_tokens: int = 0, banned_until_min: tuple[int, ...] = ()) -> torch.Tensor:
    """The processors by their definitions, with a Python loop over the vocabulary."""
    row = logits.clone().tolist()
    for t, b in (bias or {}).items():
        row[t] += b
    if len(output) < min_tokens:
        for t in banned_until_min:
            row[t] = -math.inf
    for t in set(prompt) | set(output):
        if repetition != 1.0:
            row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
    for t in set(output):
        row[t] -= frequency * output.count(t) + presence
    return torch.tensor(row)
