"""A base actor's stream item carries every step already waiting, each still one event per step."""
import asyncio

from actors.streams import drain as _drain
from actors.messages import TokenEvent


def test_drain_keeps_one_event_per_step_and_stops_at_the_finish():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(3):
            q.put_nowait(TokenEvent("r", (i,), str(i)))
        q.put_nowait(TokenEvent("r", (3,), "3", "length", 1, 4))
        q.put_nowait(TokenEvent("other", (9,), "9"))  # never read past a finish
        first = await q.get()
        return _drain(first, q), q.qsize()

    batch, left = asyncio.run(run())
    assert [ev.token_ids for ev in batch] == [(0,), (1,), (2,), (3,)]
    assert batch[-1].finish_reason == "length" and left == 1
