"""A base actor's stream item carries every step already waiting, each still one event per step."""
import asyncio

from actors.streams import take_waiting
from fapool.sequence import RequestOutput


def _out(rid, ids, finish=None):
    return RequestOutput(rid, ids, "".join(map(str, ids)), finish is not None, finish, 1, len(ids))


def test_drain_takes_every_waiting_event_of_every_request_each_one_step():
    async def run():
        q: asyncio.Queue = asyncio.Queue()
        for i in range(3):
            q.put_nowait(_out("r", (i,)))
        q.put_nowait(_out("r", (3,), "length"))
        q.put_nowait(_out("other", (9,)))  # a feed carries many requests: read past a finish
        first = await q.get()
        return take_waiting(first, q), q.qsize()

    batch, left = asyncio.run(run())
    assert [(ev.request_id, ev.new_token_ids) for ev in batch] == [("r", (0,)), ("r", (1,)), ("r", (2,)),
                                                                    ("r", (3,)), ("other", (9,))]
    assert batch[3].finish_reason == "length" and left == 0
