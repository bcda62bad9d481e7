"""Server-sent events and the small concurrency helpers the routes share."""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

from fastapi.responses import StreamingResponse

from fapool.sequence import RequestOutput
from serve.errors import APIError, error_body, internal_error

T = TypeVar("T")


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Gathering:
    """How long a stream gathers events before its next HTTP chunk. Serve's hop from a replica to
    its HTTP proxy costs about the same per HTTP chunk whatever the chunk carries: one chunk per
    token caps a replica near 2,500 tokens/s in all (measured on the H200 host behind the proxy,
    issue 9; with direct ingress, `fapool serve`'s default, not re-measured). So the streams of this
    process together send at most about `chunks_per_s` chunks a second (`--stream-chunks-per-s`):
    alone, a stream sends every token as it comes; at 64 streams, its tokens of ~64 ms at once."""

    MAX_INTERVAL_S = 0.1

    def __init__(self, chunks_per_s: float = 1000.0) -> None:
        self.set_rate(chunks_per_s)
        self.open_streams = 0

    def set_rate(self, chunks_per_s: float) -> None:
        if not chunks_per_s > 0:
            raise ValueError(f"stream_chunks_per_s={chunks_per_s!r}; set a positive number of chunks a second "
                             "(default 1000)")
        self.chunks_per_s = float(chunks_per_s)

    def interval_s(self) -> float:
        return min(self.open_streams / self.chunks_per_s, self.MAX_INTERVAL_S)


gathering = Gathering()  # this process's streams (the replica's), set from ServeLimits by set_current


class _SSEResponse(StreamingResponse):
    """Closes its iterator, and the request streams under it, as soon as the response ends however
    it ends: a client that leaves while a chunk is being sent cancels the send, which would leave
    the generators suspended until the garbage collector finds them, and their requests running."""

    def __init__(self, content: AsyncIterator[str], streams: Iterable[AsyncIterator], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._streams = list(streams)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close(self.body_iterator)
            for s in self._streams:  # each one's end aborts its request if it did not finish
                await close(s)


async def close(it: Any) -> None:
    """`aclose()` an async generator; nothing for other iterators or one that is running (its
    awaiter was cancelled, so it is ending already)."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except RuntimeError as e:
            if "already running" not in str(e):
                raise


def sse_response(chunks: AsyncIterator[dict], streams: Iterable[AsyncIterator] = ()) -> StreamingResponse:
    """Events ending with `data: [DONE]`. Once the stream has started (the status line is gone) any
    error arrives as an OpenAI-shaped error event before `[DONE]`: a stream never just stops.
    Still one SSE event per token, but several events per HTTP chunk: the first event and the last
    go out at once, the others gathered for `gathering.interval_s()`. `streams`: the request streams
    `chunks` reads, closed (their requests aborted if unfinished) when the response ends."""

    async def stream() -> AsyncIterator[str]:
        gathering.open_streams += 1
        try:
            async with aclosing(_groups(chunks, gathering.interval_s)) as groups:
                async for group in groups:  # a group before an error still comes whole
                    yield "".join(sse(c) for c in group)
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.code))
        except Exception as e:  # noqa: BLE001 - logged with the request id, reported as an event
            yield sse(internal_error("stream", e))
        finally:
            gathering.open_streams -= 1
        yield "data: [DONE]\n\n"

    return _SSEResponse(stream(), streams, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _groups(items: AsyncIterator[T], interval_s: Callable[[], float] = lambda: 0.0,
                  most: int = 256) -> AsyncIterator[list[T]]:
    """Items in groups: each group is one awaited item plus those that come until `interval_s()`
    after the previous group went out; the first group, or one whose time is already up, takes only
    what the iterator yields without waiting on anything. The iterator's end sends what is gathered
    at once."""
    it = items.__aiter__()
    nxt: asyncio.Future | None = None
    sent_s: float | None = None  # None until the first group goes out: it waits for nothing
    loop = asyncio.get_running_loop()
    try:
        while True:
            nxt = nxt or asyncio.ensure_future(it.__anext__())
            try:
                group = [await nxt]
            except StopAsyncIteration:
                nxt = None
                return
            nxt = None
            deadline = None if sent_s is None else sent_s + interval_s()
            while len(group) < most:
                nxt = asyncio.ensure_future(it.__anext__())
                wait_s = 0.0 if deadline is None else deadline - loop.time()
                if wait_s > 0:
                    await asyncio.wait((nxt,), timeout=wait_s)  # leaves nxt running when time is up
                else:
                    await asyncio.sleep(0)  # the iterator's step runs now; done if it did not wait
                if not nxt.done():
                    break
                fut, nxt = nxt, None
                try:
                    group.append(fut.result())
                except StopAsyncIteration:
                    yield group
                    return
                except BaseException:
                    yield group  # what came before the error still goes out, then the error
                    raise
            sent_s = loop.time()
            yield group
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        await close(items)


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """Like `asyncio.gather`, but the first failure cancels the rest and is raised as itself;
    streams that had already opened are closed, which aborts their requests."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    ok = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        results = [t.result() for t in tasks]
        ok = True
        return results
    finally:
        if not ok:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:
                if not t.cancelled() and t.exception() is None:
                    await close(t.result())


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Events of several streams as they come, tagged with their stream's index. Closing it stops
    its pumps; the streams themselves are closed by their owner (`sse_response(..., streams)`)."""
    if len(streams) == 1:  # no task and no queue hop per token for the usual single prompt
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, e))
            return
        await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is end:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
