"""Logit processors: `logit_bias`, `min_tokens` and the three penalties, on the step's device.

Order and semantics as vLLM's sampler (and, for repetition, Hugging Face's
`RepetitionPenaltyLogitsProcessor`):

1. `logit_bias`: the bias is added to its token's logit.
2. `min_tokens`: while the output is shorter, EOS (unless `ignore_eos`) and `stop_token_ids` get -inf.
3. `repetition_penalty` r: for every token in prompt + output, a positive logit is divided by r
   and a negative one multiplied by r.
4. `frequency_penalty` f and `presence_penalty` p: a token that occurs c > 0 times in the output
   loses `c * f + p`.

Only rows whose request asks for one of these are touched; the others are returned as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fapool.sampling import SamplingParams


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: Sequence[tuple[list[int], list[int]]],
                   eos_ids: frozenset[int]) -> torch.Tensor:
    """`logits` (M, vocab) with each row's processors applied; `histories[i]` is row i's
    (prompt ids, output ids). A new tensor when any row changes: the caller's stays raw."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    out = logits.float().clone()
    dev = out.device
    for i in rows:
        p, (prompt, output) = params[i], histories[i]
        row = out[i]
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=dev)
            row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=dev))
        if len(output) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
            if banned:
                row[torch.tensor(sorted(banned), dtype=torch.long, device=dev)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=dev)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=row.shape[0])
            counts = counts[: row.shape[0]].to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
    return out
