"""Typed messages between the serve layer, the controller, base actors and pool members. A request's
events are fapool's own `RequestOutput`s: one event type from the engine to the HTTP stream."""
from __future__ import annotations

from dataclasses import dataclass, field

from fapool.costfit import StepFit
from fapool.sampling import SamplingParams
from fapool.stats import EngineStats


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BaseReport:
    """What a base tells the controller: its contexts in flight and where pooled KV lives."""

    base_id: int
    epoch: int
    contexts: tuple[int, ...]
    seqs_per_member: tuple[tuple[int, int], ...] = ()  # (member_id, live pooled sequences)
    pool_failed: bool = False  # the data plane broke: check members and re-form the group


@dataclass(frozen=True)
class BaseStats:
    base_id: int
    epoch: int
    running: int
    waiting: int
    pooled: int  # running requests whose KV is spread over the pool
    pooled_total: int  # requests ever admitted to the pool
    kv_used_tokens: int
    kv_capacity_tokens: int
    contexts: tuple[int, ...]
    engine: EngineStats = EngineStats()  # KV pages, preemptions, prefill and decode rows
    members_kv: tuple[tuple[int, int, int], ...] = ()  # (member id, rows this base holds there, its share)


@dataclass(frozen=True)
class StepRecord:
    """One engine step as a base timed it (the benchmark reads these)."""

    time_s: float  # wall clock at the step's start
    wall_s: float  # the step, sampled tokens on the host included
    kind: str  # "prefill" or "decode"
    num_seqs: int
    num_tokens: int
    num_pooled: int
    max_context: int
    phases: tuple[tuple[str, float], ...] = ()  # seconds per phase, with profiling on
    read_tokens: float = 0.0  # KV tokens the base read itself (a pooled context / (members + 1))
    context_tokens: int = 0  # the batch's contexts, summed
    members: int = 0  # pool members the step exchanged with


@dataclass(frozen=True)
class ScaleEvent:
    time_s: float  # wall clock (time.time())
    from_size: int
    to_size: int
    direction: str  # "up" or "down"
    reason: str
    decided_s: float | None = None  # wall clock of the decision that led to it (scale-up time = time_s - this)


@dataclass(frozen=True)
class PoolStatus:
    """The controller's state, for `/pool`, the dashboard and the metrics."""

    size: int
    target: int
    epoch: int
    members: tuple[int, ...]
    draining: tuple[int, ...]
    standby: int  # started, idle members that a scale-up takes first
    capacity: int
    longest_context: int
    contexts: tuple[int, ...]
    events: tuple[ScaleEvent, ...] = field(default=())
    state: str = "ready"  # ready, growing, short_of_gpus (some wanted members unplaceable), recovering
    pending: int = 0  # members the policy wants that the cluster cannot place now
    retry_in_s: float | None = None  # when the controller next tries to start them
    fit: StepFit | None = None  # the cost model the SLO policy predicts with
    step_ms: tuple[tuple[int, float, float], ...] = ()  # (base, measured, predicted) median decode step
