"""A base's step time, fitted online from its own step log: what the SLO pool policy predicts with.

    decode:  a + b·B + c·R + d·P        R = KV tokens the base reads itself (a pooled sequence's
                                          context divided by P + 1), B sequences, P members
    prefill: e + f·n + g·n·L/(P+1) + h·P·n   n new tokens, L the longest context, P members

The same terms as `bench/costmodel.py` (which adds the GPU's probed rates to them), in tokens, so the
fit needs nothing but the steps. Least squares on relative error, coefficients kept >= 0. A member
term the samples cannot identify (no step used the pool yet) keeps the prior's value, 0 by default:
an optimistic prior, so the policy tries the pool once, measures it, and learns what it costs.
`error` is the median |predicted / measured - 1| over the samples fitted: the metric the controller
exports, and the figure to trust a prediction by.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

DECODE_TERMS, PREFILL_TERMS = "abcd", "efgh"


@dataclass(frozen=True)
class StepSample:
    """One timed engine step (from `StepRecord`)."""

    kind: str  # "decode" or "prefill"
    num_seqs: int
    num_tokens: int
    read_tokens: float  # KV tokens the base itself read (pooled contexts / (P + 1))
    context_tokens: int  # the batch's contexts, summed
    max_context: int
    members: int  # pool members the step exchanged with
    wall_s: float


def shape_of(kind: str, num_seqs: int, tokens: float) -> tuple[str, int, int]:
    """The bucket a step falls in (powers of two): what the cold-start guard counts."""
    return kind, max(0, int(num_seqs) - 1).bit_length(), max(0, int(tokens) - 1).bit_length()


def sample_shape(s: StepSample) -> tuple[str, int, int]:
    """Decode: batch and summed contexts; prefill: the longest context (whatever the pool size)."""
    if s.kind == "decode":
        return shape_of("decode", s.num_seqs, s.context_tokens)
    return shape_of("prefill", 1, s.max_context)


def _decode_row(s: StepSample) -> list[float]:
    return [1.0, float(s.num_seqs), float(s.read_tokens), float(s.members)]


def _prefill_row(s: StepSample) -> list[float]:
    n, p = float(s.num_tokens), float(s.members)
    return [1.0, n, n * s.max_context / (p + 1), p * n]


@dataclass(frozen=True)
class StepFit:
    decode: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    prefill: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    decode_samples: int = 0
    prefill_samples: int = 0
    decode_error: float | None = None  # median |relative error| over the samples fitted
    prefill_error: float | None = None
    decode_pooled_samples: int = 0  # samples that identify the member term d
    shapes: tuple[tuple[tuple[str, int, int], int], ...] = ()  # (shape, steps seen)

    def decode_s(self, num_seqs: int, local_tokens: float, pooled_tokens: float, members: int) -> float:
        """A decode step of `num_seqs`, `pooled_tokens` of their contexts spread over `members`."""
        a, b, c, d = self.decode
        p = members if pooled_tokens > 0 else 0  # a step with no pooled sequence exchanges nothing
        return a + b * num_seqs + c * (local_tokens + pooled_tokens / (p + 1)) + d * p

    def prefill_s(self, tokens: int, members: int) -> float:
        """A prefill of a `tokens`-token prompt with `members` members."""
        e, f, g, h = self.prefill
        return e + f * tokens + g * tokens * tokens / (members + 1) + h * members * tokens

    def ready(self, kind: str, min_samples: int) -> bool:
        return (self.decode_samples if kind == "decode" else self.prefill_samples) >= min_samples

    def seen(self, shape: tuple[str, int, int]) -> int:
        return dict(self.shapes).get(shape, 0)


def keep_recent(old: Sequence[StepSample], new: Iterable[StepSample], per_bucket: int = 1024) -> tuple[StepSample, ...]:
    """The latest `per_bucket` samples of each (kind, used the pool): pooled steps are kept apart,
    so a long spell without the pool does not forget what a member costs."""
    buckets: dict[tuple[str, bool], list[StepSample]] = {}
    for s in (*old, *new):
        buckets.setdefault((s.kind, s.members > 0), []).append(s)
    return tuple(s for b in buckets.values() for s in b[-per_bucket:])


def fit_steps(samples: Iterable[StepSample], prior: StepFit = StepFit()) -> StepFit:
    """Refit on `samples`; the prior supplies the terms they cannot identify (and the rest when
    there are fewer samples than terms)."""
    samples = [s for s in samples if s.wall_s > 0]
    dec = [s for s in samples if s.kind == "decode"]
    pre = [s for s in samples if s.kind != "decode"]
    shapes: dict[tuple[str, int, int], int] = {}
    for s in samples:
        shapes[sample_shape(s)] = shapes.get(sample_shape(s), 0) + 1
    dcoef, derr = _fit_kind(dec, _decode_row, DECODE_TERMS, prior.decode)
    pcoef, perr = _fit_kind(pre, _prefill_row, PREFILL_TERMS, prior.prefill)
    return replace(prior, decode=dcoef, prefill=pcoef, decode_samples=len(dec), prefill_samples=len(pre),
                   decode_error=derr, prefill_error=perr,
                   decode_pooled_samples=sum(1 for s in dec if s.members > 0),
                   shapes=tuple(sorted(shapes.items())))


def _fit_kind(rows: Sequence[StepSample], row, names: str, prior: tuple[float, ...]) -> tuple[tuple, float | None]:
    if len(rows) < len(names):
        return prior, None
    X = np.array([row(s) for s in rows])
    y = np.array([s.wall_s for s in rows])
    fixed = {names[3]: "no step used the pool"} if not any(s.members for s in rows) else {}
    coef = nonneg_fit(X, y, names, fixed, offsets={names[3]: prior[3]})
    beta = np.array([coef[t] for t in names])
    err = float(statistics.median(np.abs(X @ beta / y - 1.0)))
    return tuple(float(x) for x in beta), err


def nonneg_fit(X: np.ndarray, y: np.ndarray, names: str, fixed: dict[str, str],
               offsets: dict[str, float] | None = None) -> dict[str, float]:
    """Least squares on relative error; drop the most negative coefficient and refit until none is.
    A fixed term takes its value from `offsets` (default 0); `fixed` gains the dropped terms."""
    offsets = offsets or {}
    known = np.array([offsets.get(t, 0.0) if t in fixed else 0.0 for t in names])
    free = [i for i, t in enumerate(names) if t not in fixed]
    A, target = X / y[:, None], 1.0 - (X @ known) / y
    while free:
        beta = np.linalg.lstsq(A[:, free], target, rcond=None)[0]
        worst = int(np.argmin(beta))
        if beta[worst] >= 0:
            out = {t: float(known[i]) for i, t in enumerate(names)}
            out.update({names[i]: float(beta[k]) for k, i in enumerate(free)})
            return out
        fixed[names[free[worst]]] = f"came out negative ({beta[worst]:.3g}) and was dropped"
        free.pop(worst)
    return {t: float(known[i]) for i, t in enumerate(names)}
