"""The bench.elastic replay and a real `fapool serve` make the same pool sizes on one trace: the
replay drives the service's own policy and membership code, so the same trace through HTTP and
through the fake clock must give the same sequence of pool sizes."""
from __future__ import annotations

import time

import httpx

from bench.elastic.costs import load
from bench.elastic.replay import Setup, replay
from bench.elastic.workloads import Request
from fapool.policy import PolicyConfig, PoolCurve

# The flags of conftest's `fapool_server`: --pool-curve 16:1,32:2,64:3 --pool-cooldown-s 2.
POLICY = PolicyConfig(curve=PoolCurve.parse("16:1,32:2,64:3"), max_pool=32, cooldown_s=2.0)
PROMPTS = (20, 70, 5, 40)  # with 4 tokens out: contexts that want 1, 3, 0 and 2 members
OUT = 4


def pool_of(c: httpx.Client) -> dict:
    return c.get("/pool").json()


def wait_for_empty_pool(c: httpx.Client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while pool_of(c)["size"] != 0:
        assert time.monotonic() < deadline, f"the pool did not drain: {pool_of(c)}"
        time.sleep(0.2)


def test_replay_makes_the_same_pool_sizes_as_fapool_serve(fapool_server):
    with httpx.Client(base_url=fapool_server, timeout=120) as c:
        wait_for_empty_pool(c)
        before = len(pool_of(c)["events"])
        for i, n in enumerate(PROMPTS):  # one at a time, each after the pool has settled
            body = {"prompt_token_ids": [3 + (i + j) % 200 for j in range(n)], "max_tokens": OUT,
                    "temperature": 0, "ignore_eos": True}
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            wait_for_empty_pool(c)
        served = [0] + [e["to_size"] for e in pool_of(c)["events"][before:]]

    trace = [Request(30.0 * i, n, OUT) for i, n in enumerate(PROMPTS)]
    replayed = replay(Setup("serve", POLICY, num_bases=1), trace, load())
    assert [n for _, n in replayed.pool_sizes] == served == [0, 1, 0, 3, 0, 2, 0]
