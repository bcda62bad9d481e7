"""Log-probabilities of sampled and prompt tokens, with their top alternatives.

They are of the model's raw distribution: `log_softmax` of the logits before any logit processor
(penalties, `logit_bias`, `min_tokens`) and before temperature, top-k and top-p. That is what
OpenAI reports and vLLM reports by default, and what `lm-eval` needs for log-likelihoods.
Each batch of rows costs one device-to-host copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Prompt rows turned into logits at once: bounds the (rows, vocab) float32 buffer of a long prompt.
PROMPT_ROWS_PER_PASS = 256


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position (id, logprob),
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def sampled_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Row i's `tokens[i]` with its logprob and `ks[i]` alternatives; None where `ks[i]` is None."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if not rows:
        return out
    picked = _with_top(logits[rows], [int(tokens[i]) for i in rows], max(ks[i] for i in rows))
    for i, lp in zip(rows, picked):
        out[i] = TokenLogprob(lp.token_id, lp.logprob, lp.top[: ks[i]])
    return out


def prompt_logprobs(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    targets: list[int], k: int) -> list[TokenLogprob]:
    """For hidden rows at positions p, the logprob of `targets[j]` (the token at p + 1) given the
    tokens up to p, with `k` alternatives. `logits_of` is the model's LM head."""
    out: list[TokenLogprob] = []
    for a in range(0, len(targets), PROMPT_ROWS_PER_PASS):
        b = min(a + PROMPT_ROWS_PER_PASS, len(targets))
        out += _with_top(logits_of(hidden[a:b]), targets[a:b], k)
    return out


def _with_top(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(tokens, dtype=torch.long, device=logp.device).clamp_(0, logp.shape[-1] - 1)
    chosen = logp.gather(1, idx[:, None])[:, 0]
    if k:
        top_v, top_i = logp.topk(k, dim=-1)
        host = torch.cat([chosen[:, None], top_v], dim=1).cpu()
        ids = top_i.cpu().tolist()
    else:
        host, ids = chosen[:, None].cpu(), [[] for _ in tokens]
    vals = host.tolist()
    return [TokenLogprob(t, v[0], tuple(zip(ids[r], v[1:]))) for r, (t, v) in enumerate(zip(tokens, vals))]
