"""`/health`'s source: is some base alive right now? The supervisor's verdict (a ping every 0.5 s,
a 5 s timeout) lags a death by a second or more, while requests already fail; so `/health` asks
the bases itself, each time, with a short wait.

A base counts as live when the supervisor has not given it up and it answers a ping within
PING_WAIT_S (pings are answered on its event loop, never behind an engine step). A ping that
fails (Ray: the actor died, or is restarting) makes it dead at once; one that does not come back
in time keeps the base's last verdict, since Ray queues calls to a restarting actor: a base that
died stays dead until it answers again.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

PING_WAIT_S = 0.3


class Liveness:
    def __init__(self) -> None:
        self._ok_at: dict[Any, float] = {}  # per base handle: when it last answered
        self._failed_at: dict[Any, float] = {}  # when a ping to it last failed

    def _record(self, base: Any, ref: Any) -> None:
        def done(fut: Any) -> None:
            (self._failed_at if fut.exception() is not None else self._ok_at)[base] = time.monotonic()

        ref.future().add_done_callback(done)

    def _dead(self, base: Any) -> bool:
        return self._failed_at.get(base, -1.0) > self._ok_at.get(base, 0.0)

    async def any_live(self, bases: list[Any], healthy: list[bool]) -> bool:
        candidates = [b for b, ok in zip(bases, healthy) if ok]
        if not candidates:
            return False
        refs = [b.ping.remote() for b in candidates]
        for b, ref in zip(candidates, refs):
            self._record(b, ref)
        waits = [asyncio.ensure_future(_answer(ref)) for ref in refs]
        for fut in asyncio.as_completed(waits, timeout=PING_WAIT_S):
            try:
                if await fut:
                    return True
            except asyncio.TimeoutError:
                break
        await asyncio.sleep(0)  # let the failed pings' callbacks record them
        return any(not self._dead(b) and not _failed(w) for b, w in zip(candidates, waits))


async def _answer(ref: Any) -> bool:
    try:
        await ref
        return True
    except Exception:  # noqa: BLE001 - RayActorError: dead or restarting
        return False


def _failed(wait: asyncio.Future) -> bool:
    return wait.done() and not wait.cancelled() and wait.result() is False
