"""The pool actors a controller owns: the members of the current epoch (some draining) and a warm
standby. `PoolMembers` starts, moves and stops them; the controller decides how many (the policy)
and forms the data-plane epochs (`form_epoch`, given at construction), since those need the bases.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

import ray

from actors.capacity import on_cuda
from actors.config import ClusterConfig
from actors.epochs import Member
from actors.messages import ScaleEvent
from actors.pool_actor import AttentionPoolActor
from fapool.policy import MAX_POOL
from fapool.pool_plan import RemovalCause

log = logging.getLogger(__name__)
FormEpoch = Callable[[dict[int, Member], set[int]], Awaitable[None]]


class PoolMembers:
    def __init__(self, cfg: ClusterConfig, form_epoch: FormEpoch) -> None:
        self.cfg = cfg
        self.members: dict[int, Member] = {}
        self.standby: dict[int, Member] = {}  # started, idle, in no epoch
        self.draining: set[int] = set()
        self.events: deque[ScaleEvent] = deque(maxlen=cfg.max_events)
        self.scale_counts = {"up": 0, "down": 0}
        self._form_epoch = form_epoch
        self._next_id = 1
        self._standby_starting = 0
        self.starting = 0  # cold members being started for the pool (not standby)

    def reconfigure(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg

    def handle(self, member_id: int) -> Any:
        return self.members[member_id].handle

    def revive(self, ids: tuple[int, ...]) -> None:
        self.draining -= set(ids)

    def drain(self, ids: tuple[int, ...]) -> None:
        self.draining |= set(ids)

    async def add_standby(self, n: int, reason: str, model: dict[str, Any], decided_s: float | None = None) -> int:
        """Grow by up to `n` warm standby members (they only need to join the new epoch); returns
        how many more the caller must start cold (`start_cold`)."""
        take = [self.standby.pop(mid) for mid in sorted(self.standby)[:n]]
        if take:
            grown = dict(self.members)
            grown.update({m.info.member_id: m for m in take})
            await self._change(grown, "up", reason, decided_s)
            self.refill_standby(model)
        return n - len(take)

    async def start_cold(self, n: int, model: dict[str, Any]) -> dict[int, Member]:
        """Start `n` members (in the background of the controller's tick, which has counted them
        in `starting`); those Ray has not placed and started within `member_start_timeout_s` are
        killed: the caller backs off and retries."""
        try:
            return await self._start(n, model, self.cfg.member_start_timeout_s)
        finally:
            self.starting -= n

    async def adopt(self, started: dict[int, Member], want: int, reason: str, model: dict[str, Any],
                    decided_s: float | None = None) -> None:
        """Join `want` of the freshly `started` members to a new epoch; the rest become warm standby
        (the target fell while they started), or stop."""
        ids = sorted(started)
        join, spare = ids[:max(want, 0)], ids[max(want, 0):]
        if join:
            await self._change({**self.members, **{i: started[i] for i in join}}, "up", reason, decided_s)
        for i in spare:
            if len(self.standby) < self.cfg.standby_members:
                self.standby[i] = started[i]
            else:
                ray.kill(started[i].handle)
        self.refill_standby(model)

    async def remove(self, ids: list[int], cause: RemovalCause, reason: str) -> None:
        gone = [self.members[m] for m in ids]
        await self._change({k: v for k, v in self.members.items() if k not in ids}, "down", reason)
        for m in gone:
            if len(self.standby) < self.cfg.standby_members and cause.may_stay_warm:
                self.standby[m.info.member_id] = m  # drained, healthy: keep it warm
            else:
                ray.kill(m.handle)

    def refill_standby(self, model: dict[str, Any]) -> None:
        missing = self.cfg.standby_members - len(self.standby) - self._standby_starting
        if missing > 0 and len(self.members) + len(self.standby) + missing <= MAX_POOL:
            self._standby_starting += missing

            async def fill() -> None:
                try:
                    self.standby.update(await self._start(missing, model))
                finally:
                    self._standby_starting -= missing

            asyncio.get_running_loop().create_task(fill())

    async def dead(self) -> list[int]:
        """Members that no longer answer a ping."""
        pings = {mid: m.handle.ping.remote() for mid, m in self.members.items()}
        dead = []
        for mid, ref in pings.items():
            try:
                await asyncio.wait_for(ref, timeout=10.0)
            except Exception:  # noqa: BLE001 - RayActorError or timeout: the member is gone
                dead.append(mid)
        return dead

    def kill_all(self) -> None:
        for m in (*self.members.values(), *self.standby.values()):
            ray.kill(m.handle)
        self.members.clear()
        self.standby.clear()

    async def _start(self, n: int, model: dict[str, Any], timeout_s: float | None = None) -> dict[int, Member]:
        """Start `n` pool actors; those that fail to start (or to be placed within `timeout_s`)
        are dropped (and logged)."""
        if n <= 0:
            return {}
        opts = self.cfg.actor_options(on_cuda(self.cfg))
        if self.cfg.member_resources:
            opts["resources"] = dict(self.cfg.member_resources)
        # Members live and die with this controller (max_restarts=0): a lost member costs its
        # bases a recompute, and the policy starts a new one.
        cls = ray.remote(AttentionPoolActor).options(**opts, max_concurrency=8, max_restarts=0)
        new = {}
        for _ in range(n):
            mid, self._next_id = self._next_id, self._next_id + 1
            new[mid] = cls.remote(mid, model["model_config"], model["dtype"], model["device_type"],
                                  self.cfg.member_kv_capacity_tokens, self.cfg.engine.attention_kernel,
                                  self.cfg.data_plane_timeout_s, self.cfg.profile)
        results = await asyncio.gather(*(asyncio.wait_for(h.info.remote(), timeout_s) for h in new.values()),
                                       return_exceptions=True)
        started = {}
        for (mid, h), res in zip(new.items(), results):
            if isinstance(res, BaseException):
                log.warning("pool member %d failed to start: %s", mid,
                            f"not placed and started within {timeout_s:.0f} s" if isinstance(res, asyncio.TimeoutError) else res)
                ray.kill(h)
            else:
                started[mid] = Member(h, res)
        return started

    async def _change(self, members: dict[int, Member], direction: str, reason: str,
                      decided_s: float | None = None) -> None:
        """Form the new epoch first; only then does the new size show (status, events, metrics)."""
        draining = self.draining & set(members)
        await self._form_epoch(members, draining)
        before = len(self.members)
        self.members, self.draining = members, draining
        self.events.append(ScaleEvent(time.time(), before, len(members), direction, reason, decided_s))
        self.scale_counts[direction] += 1
        log.info("pool %s %d -> %d: %s", direction, before, len(members), reason)
