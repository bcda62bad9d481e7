"""The pool policy: a pure function from the contexts in flight to the pool's target size.

    decision = decide(contexts, capacity, previous_state, now_s, policy_config)

`pool_size` is the one rule for how many members a context wants: the controller's target and a
base's choice to wait for a growing pool both come from it.

Scale-up is immediate; scale-down waits until the smaller size has been enough for `cooldown_s`,
so a pool does not thrash between bursts of long requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


@dataclass(frozen=True)
class PolicyConfig:
    curve: PoolCurve = PoolCurve.parse(DEFAULT_CURVE)
    max_pool: int = MAX_POOL  # the `--max-pool` cap
    cooldown_s: float = 30.0  # how long a smaller size must suffice before shrinking

    def __post_init__(self) -> None:
        if not 0 <= self.max_pool <= MAX_POOL:
            raise ValueError(f"max_pool={self.max_pool}; use 0..{MAX_POOL}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s={self.cooldown_s}; use a duration >= 0")


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
    """Members a context of `context_len` tokens wants: the curve, capped by `cfg.max_pool` and by
    `capacity` (the members the cluster can give)."""
    return min(cfg.curve.size_for(context_len), cfg.max_pool, max(capacity, 0))


def decide(
    contexts: Sequence[int], capacity: int, prev: PolicyState, now_s: float, cfg: PolicyConfig
) -> Decision:
    """Target pool size for `contexts` (tokens of each request in flight), at most `capacity`
    actors (the GPUs Ray can give) and `cfg.max_pool`."""
    longest = max(contexts, default=0)
    wanted = pool_size(longest, capacity, cfg)
    if wanted >= prev.target:
        reason = f"longest context {longest} wants {wanted}" if wanted > prev.target else "steady"
        return Decision(wanted, PolicyState(wanted, None), wanted, reason)
    since = prev.below_since_s if prev.below_since_s is not None else now_s
    if now_s - since >= cfg.cooldown_s:
        reason = f"longest context {longest} wants {wanted} for {now_s - since:.1f}s >= cooldown"
        return Decision(wanted, PolicyState(wanted, None), wanted, reason)
    return Decision(prev.target, PolicyState(prev.target, since), wanted, "cooling down")
