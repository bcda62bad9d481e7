"""A response that ends early closes what it streams at once, not when the garbage collector finds
it: the client left while a chunk was being sent (the send is cancelled), and the request under
the stream must end (its `finally` aborts it on the base) while the response object still exists."""
import asyncio

from serve.sse import sse_response


def test_a_send_cancelled_mid_stream_closes_the_request_stream_at_once():
    ended = asyncio.Event()

    async def request_stream():
        try:
            for i in range(10_000):
                await asyncio.sleep(0.001)
                yield {"i": i}
        finally:
            ended.set()

    async def run():
        events = request_stream()

        async def chunks():
            async for ev in events:
                yield ev

        response = sse_response(chunks(), [events])
        sent = []
        blocked = asyncio.Event()

        async def send(message):
            sent.append(message)
            if len(sent) >= 3:  # the client stops reading: this send never completes
                blocked.set()
                await asyncio.Event().wait()

        async def receive():
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        task = asyncio.ensure_future(response(scope, receive, send))
        await asyncio.wait_for(blocked.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # `response` (and through it every generator) is still referenced here.
        assert ended.is_set(), "the request stream was left running after its response ended"
        assert sent[0]["type"] == "http.response.start"
        return response

    assert asyncio.run(run()) is not None


def test_a_stream_read_to_its_end_is_closed_once_and_cleanly():
    closed = []

    async def request_stream():
        try:
            for i in range(3):
                yield {"i": i}
        finally:
            closed.append(True)

    async def run():
        events = request_stream()

        async def chunks():
            async for ev in events:
                yield ev

        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            await asyncio.Event().wait()

        await sse_response(chunks(), [events])({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        body = b"".join(m.get("body", b"") for m in sent)
        assert body.count(b"data: {") == 3 and body.endswith(b"data: [DONE]\n\n")

    asyncio.run(run())
    assert closed == [True]


def test_merged_streams_are_all_closed_when_their_response_ends_early():
    """Several choices (`n` > 1) read through `merge`, as the OpenAI routes do: each one ends."""
    from contextlib import aclosing

    from serve.sse import merge

    ended = [asyncio.Event(), asyncio.Event()]

    def request_stream(k):
        async def gen():
            try:
                for i in range(10_000):
                    await asyncio.sleep(0.001)
                    yield {"k": k, "i": i}
            finally:
                ended[k].set()
        return gen()

    async def run():
        streams = [request_stream(0), request_stream(1)]

        async def chunks():
            async with aclosing(merge(streams)) as merged:
                async for _, ev in merged:
                    yield ev

        response = sse_response(chunks(), streams)
        sent, blocked = [], asyncio.Event()

        async def send(message):
            sent.append(message)
            if len(sent) >= 3:
                blocked.set()
                await asyncio.Event().wait()

        async def receive():
            await asyncio.Event().wait()

        task = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
        await asyncio.wait_for(blocked.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert all(e.is_set() for e in ended), [e.is_set() for e in ended]
        return response

    assert asyncio.run(run()) is not None
