"""A feed carries many requests in one Ray stream: each request gets exactly its own tokens, and
when the client ends the feed, the base aborts what it still runs for it."""
import asyncio
import uuid

from actors.config import ClusterConfig
from actors.messages import GenerateRequest
from fapool import EngineConfig, SamplingParams

from tests.actors.conftest import wait_for


def test_requests_share_a_feed_and_each_gets_its_own_tokens(start_cluster):
    cluster = start_cluster(ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096)))
    prompts = [[5 + i, 40 + 3 * i, 77] * (i + 1) for i in range(6)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [cluster.generate(None, sp, prompt_token_ids=p).token_ids for p in prompts]

    async def run():
        feed = cluster.feed(0)
        reqs = [GenerateRequest(f"f-{uuid.uuid4().hex[:8]}", sp, None, tuple(p)) for p in prompts]
        queues = [feed.open(r) for r in reqs]

        async def collect(q):
            events = [await q.get()]
            while events[-1].finish_reason is None:
                events.append(await q.get())
            return events

        got = await asyncio.gather(*(collect(q) for q in queues))
        for r in reqs:
            feed.close(r.request_id)
        assert cluster.feed(0) is feed  # still alive: the next requests ride the same stream
        return got

    got = asyncio.run(run())
    assert [tuple(t for ev in evs for t in ev.new_token_ids) for evs in got] == [tuple(w) for w in want]
    # One event per step and request: a stream can still send one SSE event per token.
    assert all(len(ev.new_token_ids) <= 1 for evs in got for ev in evs)


def test_ending_a_feed_aborts_its_requests_on_the_base(start_cluster):
    cluster = start_cluster(ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096)))
    long = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)

    async def run():
        feed = cluster.feed(0)
        queues = [feed.open(GenerateRequest(f"long-{i}", long, None, (5, 6, 7))) for i in range(3)]
        for q in queues:  # every request is running
            assert (await q.get()).finish_reason is None
        feed.shutdown()
        # The waiters hear that the feed ended instead of hanging.
        last = [await asyncio.wait_for(q.get(), 30) for q in queues]
        while not all(isinstance(x, BaseException) for x in last):
            last = [x if isinstance(x, BaseException) else await asyncio.wait_for(q.get(), 30)
                    for x, q in zip(last, queues)]
        return feed

    feed = asyncio.run(run())
    assert not feed.alive and cluster.feed(0) is not feed  # the next caller gets a new feed
    base = cluster.bases[0]
    import ray

    wait_for(lambda: ray.get(base.stats.remote()).running == 0, what="the base to abort the feed's requests")
