"""Feeds: the one way a request's events leave a base (`BaseActor.feed`), one Ray stream per
(client, base) for all of that client's requests on that base.

A per-request stream would cost the base one Ray item per request and step: at 64 streams that is
the base's event loop serialising and sending thousands of items a second, in the same process
(and under the same GIL) as the engine thread. A feed carries every event waiting, for every
request of this client, in one item; this side hands each event to its request's queue.

    feed = cluster.feed(b)          # on the caller's event loop
    events = feed.open(req)         # the request starts on base b
    ev = await events.get()         # a RequestOutput, or the exception that ended the feed
    feed.close(req.request_id)

`run_request` is the blocking form for one request (any thread, no event loop): a feed of its own.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, Iterator

import ray

from actors.messages import GenerateRequest
from fapool.sequence import RequestOutput

Item = RequestOutput | BaseException


class FeedEnded(Exception):
    """The base ended a feed without an error (it never does while the feed is wanted)."""


class Feed:
    def __init__(self, base: Any) -> None:
        self.base = base
        self.id = f"feed-{uuid.uuid4().hex[:12]}"
        self.failure: BaseException | None = None
        self._subs: dict[str, asyncio.Queue[Item]] = {}
        self._gen = base.feed.options(num_returns="streaming").remote(self.id)
        self._pump_task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.failure is None

    def open(self, req: GenerateRequest) -> asyncio.Queue[Item]:
        """Start `req` on this feed's base; its events (or the feed's failure) arrive in the queue."""
        if self._pump_task is None:  # the first request: from here on, on this event loop
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())
        events: asyncio.Queue[Item] = asyncio.Queue()
        self._subs[req.request_id] = events
        if self.failure is not None:
            events.put_nowait(self.failure)
        else:
            self.base.submit.remote(self.id, req)  # a refusal comes back as an error event
        return events

    def close(self, request_id: str) -> None:
        """Forget a request (ended, or abandoned by its caller, who aborts it on the base)."""
        self._subs.pop(request_id, None)

    def shutdown(self) -> None:
        """End the feed (from any thread): the base aborts what it still runs for it, and the
        waiters here hear that the stream ended."""
        try:
            ray.cancel(self._gen)
        except Exception:  # noqa: BLE001 - the base is gone already
            pass

    async def _pump(self) -> None:
        try:
            async for ref in self._gen:
                for ev in await ref:
                    events = self._subs.get(ev.request_id)
                    if events is not None:
                        events.put_nowait(ev)
            raise FeedEnded("the base ended the stream early")
        except asyncio.CancelledError:
            self._fail(FeedEnded("the feed was shut down"))
            raise
        except Exception as e:  # noqa: BLE001 - a dead base (RayActorError) or worse: every waiter hears it
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.failure = e
        for events in self._subs.values():
            events.put_nowait(e)


def run_request(base: Any, req: GenerateRequest) -> Iterator[RequestOutput]:
    """Blocking: `req`'s events on `base` as they come, the last one finished, through a feed of
    its own. Leaving the loop early ends the feed, which aborts the request on the base."""
    feed_id = f"feed-{uuid.uuid4().hex[:12]}"
    gen = base.feed.options(num_returns="streaming").remote(feed_id)
    base.submit.remote(feed_id, req)
    try:
        for ref in gen:
            for ev in ray.get(ref):
                yield ev
                if ev.finish_reason is not None:
                    return
    finally:
        try:
            ray.cancel(gen)
        except Exception:  # noqa: BLE001 - the base is gone already
            pass
