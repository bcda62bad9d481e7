"""Where a base's engine thread meets the Ray calls that stream requests: one asyncio queue per
request, filled from the engine thread with one event-loop wake-up per step."""
from __future__ import annotations

import asyncio
from actors.messages import TokenEvent
from fapool.sequence import RequestOutput


def drain(ev: TokenEvent, events: asyncio.Queue, stop_at_finish: bool = True) -> tuple[TokenEvent, ...]:
    """The event just awaited plus those already waiting: when the engine runs ahead of the caller,
    one Ray streaming item carries several steps instead of costing a round each. Each event stays
    one engine step (at most one token), so the ingress can still stream one event per token. One
    request's queue is read up to its finish; a feed's (many requests) with `stop_at_finish=False`."""
    batch = [ev]
    while not (stop_at_finish and batch[-1].finish_reason is not None) and not events.empty():
        batch.append(events.get_nowait())
    return tuple(batch)


def _deliver(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for events, ev in items:
        events.put_nowait(ev)


def event_of(out: RequestOutput, error: str | None = None) -> TokenEvent:
    return TokenEvent(
        out.request_id, out.new_token_ids, out.text_delta,
        ("error" if error else out.finish_reason) if out.finished else None,
        out.prompt_tokens, out.completion_tokens, error or out.error, "internal" if error else None,
        out.logprobs, out.prompt_logprobs, out.queue_s, out.cached_tokens,
    )


class Streams:
    def __init__(self) -> None:
        self._by_id: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def open(self, rid: str) -> asyncio.Queue:
        """The request's queue, on the caller's event loop; `close` it when the stream ends."""
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.attach(rid, events)
        return events

    def attach(self, rid: str, events: asyncio.Queue) -> None:
        """Route the request's events to `events` (a feed's queue, shared by many requests)."""
        self._by_id[rid] = (asyncio.get_running_loop(), events)

    def close(self, rid: str) -> None:
        self._by_id.pop(rid, None)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def emit(self, evs: list[TokenEvent]) -> None:
        """From the engine thread: hand a step's events to their streams with one wake-up of the
        event loop, not one per request (the loop's thread competes with the engine for the GIL)."""
        targets = [(t, ev) for ev in evs if (t := self._by_id.get(ev.request_id)) is not None]
        if targets:
            targets[0][0][0].call_soon_threadsafe(_deliver, [(queue_, ev) for (_, queue_), ev in targets])
