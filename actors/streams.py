"""Where a base's engine thread meets the feeds that stream its requests' events: each request's
events go to its feed's asyncio queue, handed over from the engine thread with one event-loop
wake-up per step."""
from __future__ import annotations

import asyncio

from fapool.sequence import RequestOutput


def take_waiting(ev: RequestOutput, events: asyncio.Queue) -> tuple[RequestOutput, ...]:
    """The event just awaited plus those already waiting: when the engine runs ahead of the caller,
    one Ray streaming item carries several steps instead of costing a round each. Each event stays
    one engine step (at most one token), so the ingress can still stream one event per token."""
    batch = [ev]
    while not events.empty():
        batch.append(events.get_nowait())
    return tuple(batch)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for events, ev in items:
        events.put_nowait(ev)


class Streams:
    """Request id -> (the event loop of its feed, the feed's queue)."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def attach(self, rid: str, events: asyncio.Queue) -> None:
        """Route the request's events to `events` (its feed's queue, shared by many requests)."""
        self._by_id[rid] = (asyncio.get_running_loop(), events)

    def close(self, rid: str) -> None:
        self._by_id.pop(rid, None)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def emit(self, evs: list[RequestOutput]) -> None:
        """From the engine thread: hand a step's events to their streams with one wake-up of the
        event loop, not one per request (the loop's thread competes with the engine for the GIL)."""
        targets = [(t, ev) for ev in evs if (t := self._by_id.get(ev.request_id)) is not None]
        if targets:
            targets[0][0][0].call_soon_threadsafe(_deliver, [(queue_, ev) for (_, queue_), ev in targets])
