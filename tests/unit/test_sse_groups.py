"""How a stream's events are grouped into HTTP chunks (serve/sse.py): the first goes out at once,
later ones are gathered for the interval, the end sends what is gathered without waiting."""
import asyncio
import time

import pytest

from serve import sse


async def spaced(items, gap_s):
    for x in items:
        await asyncio.sleep(gap_s)
        yield x


async def timed_groups(items, interval_s):
    t0 = time.monotonic()
    return [(g, time.monotonic() - t0) async for g in sse._groups(items, lambda: interval_s)]


def test_events_are_gathered_for_the_interval():
    # 12 events 10 ms apart with a 200 ms interval: the first alone, then the rest in one or two
    # chunks (two or three if a busy machine stretches the gaps).
    groups = [g for g, _ in asyncio.run(timed_groups(spaced(range(12), 0.01), 0.2))]
    assert [x for g in groups for x in g] == list(range(12))  # nothing lost, nothing reordered
    assert groups[0] == [0]
    assert len(groups) <= 4 and max(len(g) for g in groups) >= 4, groups


def test_the_end_sends_what_is_gathered_without_waiting_for_the_interval():
    out = asyncio.run(timed_groups(spaced(range(3), 0.01), 5.0))
    assert [g for g, _ in out] == [[0], [1, 2]]
    assert out[-1][1] < 1.0, out  # not 5 s after the first chunk


def test_without_an_interval_each_event_that_had_to_be_waited_for_is_its_own_chunk():
    groups = [g for g, _ in asyncio.run(timed_groups(spaced(range(5), 0.005), 0.0))]
    assert groups == [[0], [1], [2], [3], [4]]


def test_events_at_hand_go_out_together_even_without_an_interval():
    async def burst():
        for x in range(5):
            yield x  # never waits

    groups = [g for g, _ in asyncio.run(timed_groups(burst(), 0.0))]
    assert groups == [[0, 1, 2, 3, 4]]


def test_an_error_sends_what_came_before_it_then_raises():
    async def failing():
        yield 1
        await asyncio.sleep(0.005)
        yield 2
        raise RuntimeError("boom")

    async def run():
        seen = []
        try:
            async for g in sse._groups(failing(), lambda: 0.05):
                seen.append(g)
        except RuntimeError as e:
            return seen, str(e)
        return seen, None

    seen, err = asyncio.run(run())
    assert [x for g in seen for x in g] == [1, 2] and err == "boom"


def test_the_interval_grows_with_the_streams_open_and_is_capped():
    g = sse.Gathering(1000)
    g.open_streams = 1
    one = g.interval_s()
    g.open_streams = 64
    many = g.interval_s()
    g.open_streams = 100_000
    capped = g.interval_s()
    assert one <= 0.001 < many < capped == sse.Gathering.MAX_INTERVAL_S


def test_a_bad_chunk_rate_is_refused_by_name():
    from serve.options import ServeOptions, flag_error

    for bad in (0, -5):
        with pytest.raises(ValueError, match="stream_chunks_per_s"):
            sse.Gathering(bad)
        with pytest.raises(ValueError) as e:
            ServeOptions(stream_chunks_per_s=bad)
        assert flag_error(e.value).startswith("--stream-chunks-per-s")
    assert ServeOptions(stream_chunks_per_s=250).limits().stream_chunks_per_s == 250.0
