"""The dashboard's memory: the last hour of pool samples, kept in the ingress process, so a tab
opened now draws the hour before it (`GET /pool/history`), not one point.

A sample is what the page draws, one flat-ish dict per `every_s`; a new chart adds its key in
`sample_of` (and reads it in the page), nothing else changes.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

WINDOW_S = 3600.0
EVERY_S = 2.0


def _ms(latency: dict, key: str) -> dict[str, float | None]:
    q = latency.get(key) or {}
    return {p: (None if q.get(p) is None else 1e3 * q[p]) for p in ("p50", "p90", "p99")}


def sample_of(pool: dict[str, Any]) -> dict[str, Any]:
    """One point of the dashboard's charts, from `/pool`'s body."""
    lat = pool.get("latency") or {}
    contexts = pool.get("contexts") or []
    return {"t": pool.get("time_s") or time.time(), "size": pool.get("size"), "target": pool.get("target"),
            "longest": pool.get("longest_context"), "median": statistics.median(contexts) if contexts else 0,
            "ttft": _ms(lat, "ttft_s"), "tpot": _ms(lat, "tpot_s")}


class History:
    def __init__(self, window_s: float = WINDOW_S, every_s: float = EVERY_S) -> None:
        self.window_s, self.every_s = window_s, every_s
        self._ring: deque[dict[str, Any]] = deque(maxlen=int(window_s / every_s) + 1)
        self._task: asyncio.Task | None = None

    def add(self, sample: dict[str, Any]) -> None:
        if self._ring and sample["t"] <= self._ring[-1]["t"]:
            return  # the same snapshot again
        self._ring.append(sample)
        while self._ring and self._ring[0]["t"] < sample["t"] - self.window_s:
            self._ring.popleft()

    def samples(self, since: float | None = None) -> list[dict[str, Any]]:
        return [s for s in self._ring if since is None or s["t"] > since]

    def start(self, pool: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Sample `pool()` every `every_s` on the running loop, from now on (once)."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: the next /pool or /pool/history starts it
            return
        self._task = loop.create_task(self._run(pool))

    async def _run(self, pool: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while True:
            try:
                self.add(sample_of(await pool()))
            except Exception as e:  # noqa: BLE001 - a missed sample is a gap in the chart, not a crash
                log.debug("history sample: %s", e)
            await asyncio.sleep(self.every_s)


history = History()  # the ingress's one history: routes and the ingress's start share it
