"""`PoolController`: grows and shrinks the attention pool, and owns the pool actors.

The base actors belong to the cluster's supervisor (`actors/supervisor.py`), not to the controller,
so a controller's death never takes them down. The supervisor hands them over with `attach` (at
start, and again after the controller restarts) and tells of a base that came back with
`base_replaced`; the controller then re-learns the bases' contexts and forms a new epoch.

Each tick it applies the pure policy (`fapool.policy.decide`) to the contexts the bases report,
then reconciles through `PoolMembers` (`actors/members.py`): new members are created, started
and joined to a new data-plane epoch before any base places work on them; surplus members are
first marked draining (bases place nothing new on them) and removed only once no live sequence
holds KV there, so a scale-down never loses a request.

Members start in the background of the tick, so one the cluster cannot place (no free GPU) holds
nothing up: the tick goes on (scale-down, re-forming), the bases serve on, `/pool` shows the
member pending, the controller asks the autoscaler for GPUs and retries with backoff. The SLO
policy's cost model is refit every few seconds from the bases' step logs (`actors/step_feed.py`).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import ray

from actors.capacity import pool_capacity, request_gpus
from actors.config import ClusterConfig
from actors.epochs import Member, form_epoch, push_draining, seqs_per_member
from actors.members import PoolMembers
from actors.messages import BaseReport, PoolStatus
from actors.step_feed import StepFeed
from fapool.policy import PolicyConfig, PolicyState, decide
from fapool.pool_plan import RemovalCause, num_active, plan_membership, removable

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 2.0
BACKOFF_S = (1.0, 60.0)  # first and longest wait before starting members again after a failed start


class PoolController:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.incarnation = uuid.uuid4().hex  # a restarted controller answers `ping` with a new one
        self.bases: list[Any] = []
        self.down: set[int] = set()  # bases the supervisor saw die and not yet back: left out
        self.base_info: list[dict[str, Any]] = []
        self.pool = PoolMembers(cfg, self._form_epoch)
        self.epoch = 0
        self.state = PolicyState()
        self.reports: dict[int, BaseReport] = {}
        self.drain_deadline_s: float | None = None  # wall clock: the ingress is shutting down
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one membership change at a time (ticks, rejoins)
        self._suspect = False
        self._last_health_s = 0.0
        self._task: asyncio.Task | None = None
        self._told_capacity = cfg.policy.max_pool  # what the bases assume until told otherwise
        self.steps = StepFeed()
        self._tasks: set[asyncio.Task] = set()  # member starts running in the background
        self.recovering = False  # re-forming the pool after a restart, until the first tick ends
        self.unplaced = 0  # members of the last cold start that Ray did not place in time
        self.backoff_s = 0.0
        self.retry_at_s: float | None = None  # monotonic: no cold start before this
        self.wanted = 0  # what the policy would ask with every GPU free (pending = wanted - active)
        self.requested = 0  # the members last asked of the autoscaler

    # ---- lifecycle ------------------------------------------------------------------------
    async def ping(self) -> tuple[str, bool, float | None]:
        """(incarnation, whether bases are attached, the drain deadline if shutting down)."""
        return self.incarnation, bool(self.bases), self.drain_deadline_s

    async def attach(self, bases: list[Any]) -> list[dict[str, Any]]:
        """Take the bases (from the supervisor) and start the policy loop. After a restart this
        re-learns their contexts and epoch, and forms a fresh epoch: the old members died with
        the old controller."""
        async with self._lock:
            self.bases = list(bases)
            self.base_info = list(await asyncio.gather(*(b.ready.remote() for b in self.bases)))
            me = ray.get_runtime_context().current_actor
            await asyncio.gather(*(b.set_controller.remote(me) for b in self.bases))
            stats = await asyncio.gather(*(b.stats.remote() for b in self.bases))
            await self._tell_capacity(self.bases)
            self.epoch = max([self.epoch, *(s.epoch for s in stats)])
            self.reports = {s.base_id: BaseReport(s.base_id, s.epoch, s.contexts) for s in stats}
            if self.epoch > 0:  # a base still holds a group of members that are gone
                self.recovering = True
                await self._form_epoch({}, set())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
            self.pool.refill_standby(self.base_info[0])
        self._wake.set()
        return self.base_info

    async def start(self) -> list[dict[str, Any]]:
        """The bases' info once attached (what a joining client waits for)."""
        while not self.bases:
            await asyncio.sleep(0.1)
        return self.base_info

    async def base_replaced(self, base_id: int, base: Any) -> None:
        """A base came back (restarted by Ray, or re-created by the supervisor): forget what the
        dead one reported and give the new one the pool in a new epoch."""
        async with self._lock:
            self.reports.pop(base_id, None)
            self.down.discard(base_id)
            self.bases[base_id] = base
            self.base_info[base_id] = await base.ready.remote()
            await base.set_controller.remote(ray.get_runtime_context().current_actor)
            await self._tell_capacity([base])  # a new base assumes max_pool until told
            await self._form_epoch(self.pool.members, self.pool.draining)
        self._wake.set()

    async def base_down(self, base_id: int) -> None:
        """A base stopped answering: its contexts are no longer in flight, and the pool carries
        on with the other bases until it is back (`base_replaced`)."""
        self.down.add(base_id)
        self.reports.pop(base_id, None)
        self._wake.set()

    async def begin_drain(self, deadline_s: float) -> None:
        """The ingress is shutting down (SIGTERM): it refuses new requests and ends those still
        running at `deadline_s` (wall clock). The ingress reads this with `ping`."""
        self.drain_deadline_s = deadline_s

    async def get_bases(self) -> list[Any]:
        return self.bases

    async def get_base_info(self) -> list[dict[str, Any]]:
        return self.base_info

    async def shutdown(self) -> None:
        """Stop the policy loop and the pool members (the supervisor stops the bases)."""
        if self._task is not None:
            self._task.cancel()
        self.pool.kill_all()

    # ---- inputs and outputs ---------------------------------------------------------------
    async def report(self, r: BaseReport) -> None:
        self.reports[r.base_id] = r
        if r.pool_failed:
            self._suspect = True
        self._wake.set()

    async def status(self) -> PoolStatus:
        contexts = tuple(c for r in self.reports.values() for c in r.contexts)
        pool = self.pool
        return PoolStatus(
            size=len(pool.members), target=self.state.target, epoch=self.epoch,
            members=tuple(sorted(pool.members)), draining=tuple(sorted(pool.draining)),
            standby=len(pool.standby),
            capacity=self._capacity(), longest_context=max(contexts, default=0), contexts=contexts,
            events=tuple(pool.events), state=self._state_name(), pending=self._pending(),
            retry_in_s=None if self.retry_at_s is None else max(0.0, self.retry_at_s - time.monotonic()),
            fit=self.steps.fit, step_ms=self.steps.step_ms,
        )

    def _pending(self) -> int:
        return max(0, self.wanted - num_active(self.pool.members, self.pool.draining))

    def _state_name(self) -> str:
        if self.recovering:
            return "recovering"
        if self.unplaced or self.wanted > self.state.target:
            return "short_of_gpus"
        return "growing" if self.pool.starting else "ready"

    async def reconfigure(self, policy: PolicyConfig, standby_members: int | None = None) -> None:
        """Change the pool policy (and the warm standby) of a running cluster; bases follow."""
        changes: dict[str, Any] = {"policy": policy}
        if standby_members is not None:
            changes["standby_members"] = standby_members
        self.cfg = self.cfg.replace(**changes)
        self.pool.reconfigure(self.cfg)
        await asyncio.gather(*(b.set_policy.remote(policy) for b in self._live()))
        await self._tell_capacity(self._live())  # before any request meets the new policy
        if self.base_info:
            self.pool.refill_standby(self.base_info[0])
        self._wake.set()

    def _live(self) -> list[Any]:
        return [b for i, b in enumerate(self.bases) if i not in self.down]

    def _capacity(self) -> int:
        """Members the cluster can hold: those held or starting, and what free GPUs allow; while
        backing off a failed start, only those held and starting (so no base waits for more)."""
        held = len(self.pool.members) + len(self.pool.standby) + self.pool.starting
        if self.retry_at_s is not None:
            return min(held, pool_capacity(self.cfg, held))
        return pool_capacity(self.cfg, held)

    async def _tell_capacity(self, bases: list[Any]) -> None:
        """How many members the cluster can give: a long prompt waits only for a pool that can come."""
        self._told_capacity = self._capacity()
        await asyncio.gather(*(b.set_capacity.remote(self._told_capacity) for b in bases))

    async def member_handle(self, member_id: int) -> Any:
        return self.pool.handle(member_id)

    async def scale_counts_total(self) -> dict[str, int]:
        return dict(self.pool.scale_counts)

    # ---- the loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.tick_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001 - keep the controller alive; retry next tick
                log.exception("pool reconcile failed")

    async def _reconcile(self) -> None:
        async with self._lock:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        now = time.monotonic()
        pool = self.pool
        if self._suspect or (pool.members and now - self._last_health_s > HEALTH_EVERY_S):
            self._last_health_s = now
            await self._heal()
        live = {i: b for i, b in enumerate(self.bases) if i not in self.down}
        if self.cfg.policy.mode == "slo" and self.steps.due(now):
            await self.steps.refresh(live, now)
        if self.retry_at_s is not None and now >= self.retry_at_s:
            self.retry_at_s = None  # the backoff is over: free GPUs count again
        contexts = [c for r in self.reports.values() for c in r.contexts]
        per_base = [r.contexts for r in self.reports.values()]
        capacity = self._capacity()
        fit = self.steps.fit
        d = decide(contexts, capacity, self.state, now, self.cfg.policy, fit, per_base)
        # What the policy would ask with every GPU free: beyond `capacity` it is pending.
        self.wanted = decide(contexts, self.cfg.policy.max_pool, self.state, now, self.cfg.policy, fit,
                             per_base).target
        self.state = d.state
        if self.wanted != self.requested:
            self.requested = self.wanted
            request_gpus(self.cfg, len(self.bases), self.wanted)
        if capacity != self._told_capacity:
            self._told_capacity = capacity
            for b in self._live():
                b.set_capacity.remote(capacity)
        shrink = d.target < num_active(pool.members, pool.draining)
        plan = plan_membership(d.target, pool.members, pool.draining,
                               await seqs_per_member(self._live()) if shrink else {})
        if plan.revive:
            pool.revive(plan.revive)
            await push_draining(self._live(), pool.draining)
        if plan.add:
            decided = time.time()
            cold = await pool.add_standby(plan.add, d.reason, self.base_info[0], decided) - pool.starting
            if cold > 0 and self.retry_at_s is None:
                self._grow(cold, d.reason, decided)
        if plan.drain:
            pool.drain(plan.drain)
            await push_draining(self._live(), pool.draining)
        if pool.draining:
            idle = list(removable(pool.draining, await seqs_per_member(self._live())))
            if idle:
                await pool.remove(idle, RemovalCause.DRAINED, "drained: " + d.reason)
        self.recovering = False

    def _grow(self, n: int, reason: str, decided_s: float) -> None:
        """Start `n` members in the background; join those that started (as many as the target
        still wants) under the lock; back off when some did not start in time."""
        model = self.base_info[0]
        self.pool.starting += n  # counted at once: the next tick must not start them again

        async def grow() -> None:
            started = await self.pool.start_cold(n, model)
            self.unplaced = n - len(started)
            if self.unplaced:
                self.backoff_s = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * self.backoff_s))
                self.retry_at_s = time.monotonic() + self.backoff_s
                log.warning("pool: %d of %d members not placed in %.0f s; retrying in %.0f s", self.unplaced, n,
                            self.cfg.member_start_timeout_s, self.backoff_s)
                request_gpus(self.cfg, len(self.bases), self.wanted)
            else:
                self.backoff_s = 0.0
            async with self._lock:
                want = self.state.target - num_active(self.pool.members, self.pool.draining)
                await self.pool.adopt(started, want, reason, model, decided_s)
            self._wake.set()

        task = asyncio.get_running_loop().create_task(grow())
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    # ---- membership changes ---------------------------------------------------------------
    async def _heal(self) -> None:
        """Drop members that no longer answer; the policy replaces them on this tick."""
        self._suspect = False
        dead = await self.pool.dead()
        if dead:
            await self.pool.remove(dead, RemovalCause.DIED, f"member(s) {dead} died")
        elif any(r.pool_failed for r in self.reports.values()):
            await self._form_epoch(self.pool.members, self.pool.draining)  # a transient error: re-form the group

    async def _form_epoch(self, members: dict[int, Member], draining: set[int]) -> None:
        self.epoch += 1
        live = {i: b for i, b in enumerate(self.bases) if i not in self.down}
        await form_epoch(live, self.epoch, members, draining)
        self.reports = {k: BaseReport(r.base_id, self.epoch, r.contexts, r.seqs_per_member, False)
                        for k, r in self.reports.items()}


def pool_policy_json(pol: PolicyConfig, st: PoolStatus | None) -> dict[str, Any]:
    """`/pool`'s view of the policy and what it sees: state, pending members, targets, the fit
    and its error, per base the measured and predicted decode step."""
    fit = st.fit if st else None
    return {
        "state": st.state if st else "starting", "pending": st.pending if st else 0,
        "retry_in_s": st.retry_in_s if st else None, "policy": pol.mode,
        "tpot_slo_ms": pol.tpot_slo_ms, "ttft_slo_ms": pol.ttft_slo_ms,
        "fit": None if fit is None else {
            "decode": fit.decode, "prefill": fit.prefill, "decode_error": fit.decode_error,
            "prefill_error": fit.prefill_error, "decode_samples": fit.decode_samples,
            "prefill_samples": fit.prefill_samples, "decode_pooled_samples": fit.decode_pooled_samples},
        "step_ms": [{"base": b, "measured": m, "predicted": p} for b, m, p in (st.step_ms if st else ())],
    }
