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

    def reconfigure(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg

    def handle(self, member_id: int) -> Any:
        return self.members[member_id].handle

    def revive(self, ids: tuple[int, ...]) -> None:
        self.draining -= set(ids)

    def drain(self, ids: tuple[int, ...]) -> None:
        self.draining |= set(ids)

    async def add(self, n: int, reason: str, model: dict[str, Any]) -> None:
        """Grow by `n` members of the bases' `model` (their `ready()` info)."""
        # Warm standby members first: they only need to join the new epoch.
        take = [self.standby.pop(mid) for mid in sorted(self.standby)[:n]]
        grown = dict(self.members)
        grown.update({m.info.member_id: m for m in take})
        grown.update(await self._start(n - len(take), model))
        if len(grown) > len(self.members):
            await self._change(grown, "up", reason)
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

    async def _start(self, n: int, model: dict[str, Any]) -> dict[int, Member]:
        """Start `n` pool actors; those that fail to start are dropped (and logged)."""
        if n <= 0:
            return {}
        opts = self.cfg.actor_options(on_cuda(self.cfg))
        # Members live and die with this controller (max_restarts=0): a lost member costs its
        # bases a recompute, and the policy starts a new one.
        cls = ray.remote(AttentionPoolActor).options(**opts, max_concurrency=8, max_restarts=0)
        new = {}
        for _ in range(n):
            mid, self._next_id = self._next_id, self._next_id + 1
            new[mid] = cls.remote(mid, model["model_config"], model["dtype"], model["device_type"],
                                  self.cfg.member_kv_capacity_tokens, self.cfg.engine.attention_kernel,
                                  self.cfg.data_plane_timeout_s, self.cfg.profile)
        results = await asyncio.gather(*(h.info.remote() for h in new.values()), return_exceptions=True)
        started = {}
        for (mid, h), res in zip(new.items(), results):
            if isinstance(res, Exception):
                log.warning("pool member %d failed to start: %s", mid, res)
                ray.kill(h)
            else:
                started[mid] = Member(h, res)
        return started

    async def _change(self, members: dict[int, Member], direction: str, reason: str) -> None:
        """Form the new epoch first; only then does the new size show (status, events, metrics)."""
        draining = self.draining & set(members)
        await self._form_epoch(members, draining)
        before = len(self.members)
        self.members, self.draining = members, draining
        self.events.append(ScaleEvent(time.time(), before, len(members), direction, reason))
        self.scale_counts[direction] += 1
        log.info("pool %s %d -> %d: %s", direction, before, len(members), reason)
