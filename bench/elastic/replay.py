"""Discrete-event replay of a trace on 8 bases and up to 32 pool GPUs, with a fake clock.

The pool is driven by the service's own code: `fapool.policy.decide` for the target and
`fapool.pool_plan` for what to revive, add, drain and remove (the same functions
`actors/controller.py` calls). Around them this models what Ray and the GPUs would do: members
start in the background after the measured cold time and join the epoch then (a warm-standby
member joins after the measured scale event while the tick waits for it), as `PoolController` does; bases admit in order (`fapool/scheduler.py`), hold a long prompt up
to `pool_wait_s` for a growing pool (`fapool/pool/pooled_attention.py`), place a prompt over the
threshold on every active member, and step with the cost model's times. Time advances in ticks
of the controller (`tick_s`); inside a tick a base runs the prefills of the requests admitted
there at their arrival times, with whole decode steps in the gaps, at the step time of the tick's batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.elastic.costs import StepCosts
from bench.elastic.workloads import Request
from fapool import costfit, pool_plan
from fapool import policy as policy_mod
from fapool.costfit import StepFit, StepSample
from fapool.policy import PolicyConfig, PolicyState

REFIT_EVERY_S = 5.0  # the controller's (actors/controller.py)


@dataclass(frozen=True)
class Setup:
    """One arrangement to replay: an elastic pool (`policy`), a static pool or tensor parallelism."""

    name: str
    policy: PolicyConfig | None = None  # None: a static pool of `static_pool` members
    static_pool: int = 0
    tp: int = 1  # GPUs per base (tensor parallel); static pools only
    num_bases: int = 8
    standby_members: int = 0
    max_num_seqs: int = 64  # EngineConfig's default
    pool_wait_s: float = 30.0  # ClusterConfig's default
    tick_s: float = 0.25  # ClusterConfig's default
    max_waiting: int = 256  # per base; more is refused (the ingress's 429)
    static_threshold: int = 4096  # static pools place prompts from here (the default curve's first point)


@dataclass
class Seq:
    req: Request
    rid: int
    base: int
    admitted_s: float = -1.0
    first_s: float = -1.0
    done_s: float = -1.0
    generated: int = 0
    members: tuple[int, ...] = ()
    prefill_left_s: float = 0.0

    @property
    def context(self) -> int:
        return self.req.prompt + self.generated


@dataclass
class Base:
    waiting: list[Seq] = field(default_factory=list)
    running: list[Seq] = field(default_factory=list)
    carry_s: float = 0.0  # time left over from the last tick's whole steps

    def local_tokens(self) -> float:
        return sum(s.context / (len(s.members) + 1) for s in self.running)


class ReplayController:
    """The PoolController's decisions with a fake clock: `decide`, then `plan_membership`, then
    `removable`, as `PoolController._reconcile_locked` runs them."""

    def __init__(self, cfg: PolicyConfig, costs: StepCosts, capacity: int, standby_members: int) -> None:
        self.cfg, self.costs, self.capacity = cfg, costs, capacity
        self.state = PolicyState()
        self.members: list[int] = []
        self.draining: set[int] = set()
        self.standby: list[int] = []
        self.standby_ready_s: list[float] = []
        self.standby_members = standby_members
        self.starting: list[tuple[float, list[int]]] = []  # (joins at, ids): cold or warm starts
        self.busy_until_s = 0.0
        self.next_id = 1
        self.sizes: list[tuple[float, int]] = [(0.0, 0)]  # membership after each epoch
        self.events = {"up": 0, "down": 0}
        self.samples: tuple[StepSample, ...] = ()
        self.fit = StepFit()
        self.fits: list[StepFit] = []
        self._refit_s = 0.0
        self._refill(0.0)

    def active(self) -> list[int]:
        return [m for m in self.members if m not in self.draining]

    def gpus(self) -> int:
        return len(self.members) + sum(len(ids) for _, ids in self.starting) + len(self.standby) + len(self.standby_ready_s)

    def _refill(self, now: float) -> None:
        missing = self.standby_members - len(self.standby) - len(self.standby_ready_s)
        self.standby_ready_s += [now + self.costs.cold_start_s] * max(missing, 0)

    def _epoch(self, now: float, direction: str) -> None:
        self.sizes.append((now, len(self.members)))
        self.events[direction] += 1

    def tick(self, now: float, contexts: list[int], seqs: dict[int, int],
             per_base: list[list[int]] | None = None, steps: list[StepSample] = ()) -> None:
        self.samples = costfit.keep_recent(self.samples, steps)
        if now - self._refit_s >= REFIT_EVERY_S:  # the bases' step logs, refit as the controller does
            self.fit, self._refit_s = costfit.fit_steps(self.samples, self.fit), now
            self.fits.append(self.fit)
        self.standby += [self._new_id() for t in self.standby_ready_s if t <= now]
        self.standby_ready_s = [t for t in self.standby_ready_s if t > now]
        for t, ids in [s for s in self.starting if s[0] <= now]:
            self.starting.remove((t, ids))
            want = max(0, self.state.target - len(self.active()))  # PoolMembers.adopt
            self.members += ids[:want]
            self.standby += ids[want:][: max(0, self.standby_members - len(self.standby))]
            if want:
                self._epoch(t, "up")
        if now < self.busy_until_s:
            return
        d = policy_mod.decide(contexts, self.capacity, self.state, now, self.cfg, self.fit, per_base)
        self.state = d.state
        plan = pool_plan.plan_membership(d.target, self.members, self.draining, seqs)
        self.draining -= set(plan.revive)
        if plan.add:
            # Standby members join at once (the tick awaits their epoch); cold ones start in the
            # background (PoolController._grow) and join when up, the tick going on meanwhile.
            take, self.standby = self.standby[: plan.add], self.standby[plan.add:]
            if take:
                self.starting.append((now + self.costs.warm_start_s, take))
                self.busy_until_s = now + self.costs.warm_start_s
            starting = sum(len(ids) for _, ids in self.starting)
            cold = [self._new_id() for _ in range(plan.add - starting)]
            if cold:
                self.starting.append((now + self.costs.cold_start_s, cold))
            self._refill(now)
        self.draining |= set(plan.drain)
        idle = pool_plan.removable(self.draining, seqs)
        if idle and not plan.add:
            self.members = [m for m in self.members if m not in idle]
            self.draining -= set(idle)
            for m in idle:
                if len(self.standby) < self.standby_members:
                    self.standby.append(m)
            self._epoch(now, "down")
            self.busy_until_s = now + self.costs.warm_start_s  # forming the smaller epoch

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


@dataclass
class Outcome:
    setup: Setup
    seqs: list[Seq]
    refused: int
    queued: int
    gpu_seconds: float
    duration_s: float
    pool_trace: list[tuple[float, int, int]]  # (time, pool GPUs held, longest context in flight)
    scale_events: dict[str, int]
    pool_sizes: list[tuple[float, int]]  # (time, members) after each epoch change
    fits: list[StepFit] = field(default_factory=list)  # the online fits, in order


def replay(setup: Setup, trace: list[Request], costs: StepCosts, tail_s: float = 600.0) -> Outcome:
    """Run `trace` to completion (at most `tail_s` past the last arrival)."""
    bases = [Base() for _ in range(setup.num_bases)]
    elastic = setup.policy is not None
    ctl = ReplayController(setup.policy, costs, 32, setup.standby_members) if elastic else None
    static_members = list(range(1, setup.static_pool + 1))
    threshold = setup.policy.curve.threshold if elastic else setup.static_threshold
    member_quota = costs.base_kv_tokens / setup.num_bases  # each base owns an equal share of a member
    member_used: dict[int, list[float]] = {}  # member -> rows used per base
    seqs: list[Seq] = []
    refused = queued = 0
    gpu_s, trace_out, i, now = 0.0, [], 0, 0.0
    end_s = (trace[-1].arrival_s if trace else 0.0) + tail_s
    while now < end_s:
        t1 = now + setup.tick_s
        active = ctl.active() if elastic else static_members
        # arrivals of this tick, round robin over the bases (Cluster.pick_base)
        while i < len(trace) and trace[i].arrival_s < t1:
            s = Seq(trace[i], i, i % setup.num_bases)
            i += 1
            if len(bases[s.base].waiting) >= setup.max_waiting:
                refused += 1
                continue
            bases[s.base].waiting.append(s)
            seqs.append(s)
        for b_id, b in enumerate(bases):
            _admit(b, b_id, now, t1, setup, costs, active, threshold, member_used, member_quota,
                   ctl.capacity if elastic else setup.static_pool, elastic)
        loads = _member_loads(bases)
        steps: list[StepSample] = []
        for b in bases:
            _advance(b, now, t1, setup, costs, loads, member_used, steps)
        # the controller's tick: what the bases report, then the policy and the membership plan
        contexts = [s.context for b in bases for s in (*b.waiting, *b.running)]
        if elastic:
            counts: dict[int, int] = {}
            for b in bases:
                for s in b.running:
                    for m in s.members:
                        counts[m] = counts.get(m, 0) + 1
            ctl.tick(t1, contexts, counts, [[s.context for s in (*b.waiting, *b.running)] for b in bases], steps)
            pool_gpus = ctl.gpus()
        else:
            pool_gpus = setup.static_pool
        gpus = setup.num_bases * setup.tp + pool_gpus
        gpu_s += gpus * setup.tick_s
        trace_out.append((t1, pool_gpus, max(contexts, default=0)))
        now = t1
        idle_pool = not elastic or not (ctl.members or ctl.starting)  # bill the pool until it drains
        if i >= len(trace) and not any(b.waiting or b.running for b in bases) and idle_pool:
            break
    queued = sum(1 for s in seqs if s.admitted_s > s.req.arrival_s + 1e-9)
    events = ctl.events if elastic else {"up": 0, "down": 0}
    sizes = ctl.sizes if elastic else [(0.0, setup.static_pool)]
    return Outcome(setup, seqs, refused, queued, gpu_s, now, trace_out, events, sizes, ctl.fits if elastic else [])


def _admit(b: Base, b_id: int, now: float, t1: float, setup: Setup, costs: StepCosts, active: list[int],
           threshold: int, member_used: dict, member_quota: float, capacity: int, elastic: bool) -> None:
    """In order; a request that cannot run stops the ones behind it (fapool/scheduler.py)."""
    cap = costs.base_kv_tokens * setup.tp
    while b.waiting and b.waiting[0].req.arrival_s < t1 and len(b.running) < setup.max_num_seqs:
        s = b.waiting[0]
        n = s.req.prompt
        if elastic:
            wanted = policy_mod.pool_size(n, capacity, setup.policy)
            if wanted > len(active) and max(now, s.req.arrival_s) - s.req.arrival_s < setup.pool_wait_s:
                return  # the pool is growing for it: wait
        members: tuple[int, ...] = ()
        if n >= threshold and active:
            share = (n + s.req.output) / (len(active) + 1)
            if all(member_used.setdefault(m, [0.0] * setup.num_bases)[b_id] + share <= member_quota for m in active):
                members = tuple(active)
        local = (n + s.req.output) / (len(members) + 1)
        if b.local_tokens() + local > cap:
            return
        for m in members:
            member_used[m][b_id] += local
        s.members = members
        s.admitted_s = max(now, s.req.arrival_s)
        s.prefill_left_s = costs.prefill_s(n, len(members), setup.tp)
        b.waiting.pop(0)
        b.running.append(s)


def _member_loads(bases: list[Base]) -> dict[int, float]:
    """KV tokens each member reads per step of every base (their steps share its bandwidth)."""
    groups: dict[tuple[int, ...], float] = {}
    for b in bases:
        for s in b.running:
            if s.members:
                groups[s.members] = groups.get(s.members, 0.0) + (s.req.prompt + s.generated) / (len(s.members) + 1)
    loads: dict[int, float] = {}
    for members, tokens in groups.items():
        for m in members:
            loads[m] = loads.get(m, 0.0) + tokens
    return loads


def _advance(b: Base, now: float, t1: float, setup: Setup, costs: StepCosts, loads: dict[int, float],
             member_used: dict, steps: list[StepSample]) -> None:
    """Decode steps in the gaps between this tick's prefills, each prefill no earlier than its
    admission; one step time per base and tick, from the batch at the tick's start. `steps` gets
    what the base's step log would hold: each prefill, and the tick's decode step once."""
    t = now + b.carry_s
    live = [s for s in b.running if s.done_s < 0]
    if not live:
        b.carry_s = 0.0
        return
    members = {m for g in {s.members for s in live} for m in g}
    own = sum((s.req.prompt + s.generated) / (len(s.members) + 1) for s in live)
    kv = max([own, *(loads.get(m, 0.0) for m in members)])
    num_members = max(len(s.members) for s in live)
    step = costs.decode_s(len(live), kv, num_members, setup.tp)
    contexts = [s.req.prompt + s.generated for s in live]
    steps.append(StepSample("decode", len(live), len(live), own, sum(contexts), max(contexts), num_members, step))
    decoding = [s for s in live if s.first_s >= 0 and s.generated < s.req.output]
    for s in sorted((s for s in live if s.prefill_left_s > 0), key=lambda s: s.admitted_s):
        t = _decode(decoding, t, s.admitted_s, step, at_least_one=False)
        t = max(t, s.admitted_s) + s.prefill_left_s
        steps.append(StepSample("prefill", 1, s.req.prompt, 0.0, s.req.prompt, s.req.prompt, len(s.members),
                                s.prefill_left_s))
        s.prefill_left_s, s.first_s, s.generated = 0.0, t, 1
        if s.req.output > 1:
            decoding.append(s)
        else:
            s.done_s = t
    t = _decode(decoding, t, t1, step, at_least_one=True)
    for s in [s for s in b.running if s.done_s >= 0]:
        local = (s.req.prompt + s.req.output) / (len(s.members) + 1)
        for m in s.members:
            member_used[m][s.base] -= local
        b.running.remove(s)
    b.carry_s = max(0.0, t - t1)


def _decode(decoding: list[Seq], t: float, until: float, step: float, at_least_one: bool) -> float:
    """Whole decode steps from `t` that end by `until` (one at least, at a tick's end, so a step
    longer than a tick still runs); finished sequences leave `decoding`."""
    if not decoding or until <= t:
        return t
    k = math.floor((until - t) / step)
    if k == 0 and not at_least_one:
        return t
    k = min(max(k, 1), max(s.req.output - s.generated for s in decoding))
    for s in decoding:
        n = min(k, s.req.output - s.generated)
        s.generated += n
        if s.generated >= s.req.output:
            s.done_s = t + n * step
    decoding[:] = [s for s in decoding if s.done_s < 0]
    return t + k * step
