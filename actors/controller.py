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
from fapool.policy import PolicyConfig, PolicyState, decide
from fapool.pool_plan import RemovalCause, num_active, plan_membership, removable

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 2.0


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
            events=tuple(pool.events),
        )

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
        return pool_capacity(self.cfg, len(self.pool.members) + len(self.pool.standby))

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
        contexts = [c for r in self.reports.values() for c in r.contexts]
        prev = self.state.target
        capacity = self._capacity()
        d = decide(contexts, capacity, self.state, now, self.cfg.policy)
        self.state = d.state
        if d.target != prev:
            request_gpus(self.cfg, len(self.bases), d.target)
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
            await pool.add(plan.add, d.reason, self.base_info[0])
        if plan.drain:
            pool.drain(plan.drain)
            await push_draining(self._live(), pool.draining)
        if pool.draining:
            idle = list(removable(pool.draining, await seqs_per_member(self._live())))
            if idle:
                await pool.remove(idle, RemovalCause.DRAINED, "drained: " + d.reason)

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
