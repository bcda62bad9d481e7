"""The pool policy: a pure function from the contexts in flight to the pool's target size.

    decision = decide(contexts, capacity, previous_state, now_s, policy_config, fit, per_base)

Two policies (`PolicyConfig.mode`):
- "slo" (the default): per base, the fewest members whose predicted step time meets the targets
  (`tpot_slo_ms` for its decode step, `ttft_slo_ms` for a prefill of its longest context), from
  `fapool.costfit.StepFit`, the cost model refit on the bases' own steps. Where no size meets a
  target, the size with the shortest predicted step (often 0: members cost an exchange a step).
  Cold-start guard: no scale-up before the fit has `min_fit_steps` steps of the kind, nor for a
  base whose step shape has been seen fewer than `min_shape_steps` times.
- "curve": the pool size by the longest context (`PoolCurve`), the paper's table.

`pool_size` is the one rule for how many members a context wants: the controller's target (curve
mode) and a base's choice to wait for a growing pool both come from it; under "slo" no context
waits for the pool.

Scale-up is immediate; scale-down waits until the smaller size has been enough for `cooldown_s`
(under "slo" enough with `hysteresis` to spare), so a pool does not thrash between bursts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fapool.costfit import StepFit, shape_of

MAX_POOL = 32
DEFAULT_CURVE = "4096:8,8192:16,16384:24,32768:32"


@dataclass(frozen=True)
class PoolCurve:
    """Pool size by the longest context in flight: 0 below the first point, linear between points
    (rounded down), the last size beyond the last point."""

    points: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("pool curve is empty; give points like '4096:8,8192:16'")
        lens = [p[0] for p in self.points]
        sizes = [p[1] for p in self.points]
        if any(n < 1 for n in lens) or lens != sorted(set(lens)):
            raise ValueError(f"pool curve lengths {lens} must be positive and strictly increasing")
        if any(s < 0 or s > MAX_POOL for s in sizes) or sizes != sorted(sizes):
            raise ValueError(f"pool curve sizes {sizes} must be non-decreasing, within 0..{MAX_POOL}")

    @classmethod
    def parse(cls, text: str) -> "PoolCurve":
        """Parse "LEN:SIZE,LEN:SIZE,..." (the `--pool-curve` flag)."""
        points = []
        for part in text.split(","):
            try:
                length, size = part.split(":")
                points.append((int(length), int(size)))
            except ValueError:
                raise ValueError(
                    f"pool curve {text!r}: bad point {part.strip()!r}; write LEN:SIZE pairs "
                    f"separated by commas, e.g. {DEFAULT_CURVE!r}"
                ) from None
        return cls(tuple(points))

    def size_for(self, context_len: int) -> int:
        pts = self.points
        if context_len < pts[0][0]:
            return 0
        for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
            if context_len < n1:
                return s0 + (s1 - s0) * (context_len - n0) // (n1 - n0)
        return pts[-1][1]

    @property
    def threshold(self) -> int:
        """The shortest context that uses the pool."""
        return self.points[0][0]

    def __str__(self) -> str:
        return ",".join(f"{n}:{s}" for n, s in self.points)


MODES = ("slo", "curve")
PAPER_CURVE = PoolCurve.parse(DEFAULT_CURVE)


@dataclass(frozen=True)
class PolicyConfig:
    # `--pool-curve`: the "curve" policy's sizes, and in both modes its first point is the shortest
    # prompt placed on the pool. None: the paper's curve.
    curve: PoolCurve | None = None
    max_pool: int = MAX_POOL  # the `--max-pool` cap
    cooldown_s: float = 30.0  # how long a smaller size must suffice before shrinking
    # `--pool-policy`: "slo" or "curve"; None: "curve" when a curve is given, else "slo".
    mode: str | None = None
    tpot_slo_ms: float = 50.0  # `--tpot-slo-ms`: a base's decode step (time per output token)
    ttft_slo_ms: float = 2000.0  # `--ttft-slo-ms`: a prefill of the longest context in flight
    hysteresis: float = 0.2  # shrink only to a size predicted within (1 - hysteresis) x the target
    min_fit_steps: int = 32  # steps of a kind the fit needs before its predictions scale up
    min_shape_steps: int = 8  # steps of a base's shape seen before that shape scales up

    def __post_init__(self) -> None:
        if self.mode is None:
            object.__setattr__(self, "mode", "slo" if self.curve is None else "curve")
        if self.curve is None:
            object.__setattr__(self, "curve", PAPER_CURVE)
        if not 0 <= self.max_pool <= MAX_POOL:
            raise ValueError(f"max_pool={self.max_pool}; use 0..{MAX_POOL}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s={self.cooldown_s}; use a duration >= 0")
        if self.mode not in MODES:
            raise ValueError(f"pool policy mode={self.mode!r}; use one of {', '.join(MODES)}")
        if self.tpot_slo_ms <= 0 or self.ttft_slo_ms <= 0:
            raise ValueError(f"tpot_slo_ms={self.tpot_slo_ms}, ttft_slo_ms={self.ttft_slo_ms}; use targets > 0")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"hysteresis={self.hysteresis}; use 0 <= hysteresis < 1")


@dataclass(frozen=True)
class PolicyState:
    target: int = 0
    below_since_s: float | None = None  # since when a smaller pool would have been enough


@dataclass(frozen=True)
class Decision:
    target: int
    state: PolicyState
    wanted: int  # what the contexts alone ask for, before hysteresis
    reason: str


def pool_size(context_len: int, capacity: int, cfg: PolicyConfig) -> int:
    """Members a context of `context_len` tokens wants before it starts: the curve, capped by
    `cfg.max_pool` and by `capacity` (the members the cluster can give); 0 under "slo", where
    a context never waits for the pool."""
    if cfg.mode != "curve":
        return 0
    return min(cfg.curve.size_for(context_len), cfg.max_pool, max(capacity, 0))


def fewest_meeting(predict, target_s: float, cap: int) -> int:
    """The fewest members in 0..cap whose `predict(members)` meets `target_s`; else the fastest."""
    times = [predict(p) for p in range(cap + 1)]
    meets = [p for p, t in enumerate(times) if t <= target_s]
    return meets[0] if meets else min(range(cap + 1), key=lambda p: (times[p], p))


def slo_size(contexts: Sequence[int], cap: int, cfg: PolicyConfig, fit: StepFit, slack: float = 1.0) -> int:
    """Members one base wants for its `contexts` to meet the targets (scaled by `slack`), or 0
    while the fit or this base's shape is too new to trust (the cold-start guard)."""
    if not contexts or cap <= 0:
        return 0
    pooled = [c for c in contexts if c >= cfg.curve.threshold]  # contexts the pool would hold
    local = float(sum(contexts) - sum(pooled))
    want = 0
    shape = shape_of("decode", len(contexts), sum(contexts))
    if pooled and fit.ready("decode", cfg.min_fit_steps) and fit.seen(shape) >= cfg.min_shape_steps:
        want = fewest_meeting(lambda p: fit.decode_s(len(contexts), local, sum(pooled), p),
                              slack * cfg.tpot_slo_ms / 1e3, cap)
    longest = max(pooled, default=0)
    if longest and fit.ready("prefill", cfg.min_fit_steps) and \
            fit.seen(shape_of("prefill", 1, longest)) >= cfg.min_shape_steps:
        want = max(want, fewest_meeting(lambda p: fit.prefill_s(longest, p), slack * cfg.ttft_slo_ms / 1e3, cap))
    return want


def decide(
    contexts: Sequence[int], capacity: int, prev: PolicyState, now_s: float, cfg: PolicyConfig,
    fit: StepFit | None = None, per_base: Sequence[Sequence[int]] | None = None,
) -> Decision:
    """Target pool size for `contexts` (tokens of each request in flight; `per_base`: the same by
    base, for "slo"), at most `capacity` actors (the GPUs Ray can give) and `cfg.max_pool`."""
    longest = max(contexts, default=0)
    if cfg.mode == "curve":
        wanted = up = pool_size(longest, capacity, cfg)
        why = f"longest context {longest} wants {wanted}"
    else:
        cap = min(cfg.max_pool, max(capacity, 0))
        fit = fit or StepFit()
        groups = per_base if per_base is not None else [contexts]
        up = max((slo_size(g, cap, cfg, fit) for g in groups), default=0)
        # Shrink only to a size that meets the targets with room to spare (hysteresis).
        wanted = max(up, max((slo_size(g, cap, cfg, fit, 1 - cfg.hysteresis) for g in groups), default=0))
        why = f"predicted step times want {up} for {cfg.tpot_slo_ms:g} ms TPOT / {cfg.ttft_slo_ms:g} ms TTFT"
    if up > prev.target:
        return Decision(up, PolicyState(up, None), up, why)
    if wanted >= prev.target:
        return Decision(prev.target, PolicyState(prev.target, None), wanted, "steady")
    since = prev.below_since_s if prev.below_since_s is not None else now_s
    if now_s - since >= cfg.cooldown_s:
        reason = f"{why} for {now_s - since:.1f}s >= cooldown"
        return Decision(wanted, PolicyState(wanted, None), wanted, reason)
    return Decision(prev.target, PolicyState(prev.target, since), wanted, "cooling down")
