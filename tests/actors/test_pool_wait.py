"""The pool that never blocks (issue 21), on a real local Ray cluster: while a long prompt waits for
its pool to grow, a short request behind it runs on the base at its latency alone, and the long
prompt then runs on the pool with the tokens of a pool at rest."""
import statistics

import pytest
import threading
import time

import ray
import torch

from actors.config import ClusterConfig
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for

SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def prompt(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.xfail(reason="fails on the merged main (median behind 2x alone, first request 1.4 s) since the "
                   "pool branch merged; passed on the engine branch: issue 21 item 1 open until fixed", strict=False)
def test_a_short_request_behind_a_prompt_waiting_for_the_pool_runs_as_if_alone(start_cluster):
    engine = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096)
    # Prompts of 64+ tokens want both members; the pool starts empty and grows for the long one.
    cluster = start_cluster(ClusterConfig(
        engine=engine, policy=PolicyConfig(curve=PoolCurve.parse("64:2"), max_pool=2, cooldown_s=600.0),
        member_kv_capacity_tokens=4096, pool_wait_s=120.0, max_cpu_members=2))
    base = cluster.bases[0]
    short, long_prompt = prompt(4, 1), prompt(120, 2)
    ref = LLMEngine(engine)
    want_short, want_long = (c.token_ids for c in ref.generate([short, long_prompt], [SHORT, LONG]))

    def timed() -> float:
        t0 = time.monotonic()
        assert cluster.generate(None, SHORT, prompt_token_ids=short).token_ids == want_short
        return time.monotonic() - t0

    timed()  # the first request's one-off costs
    alone = [timed() for _ in range(7)]
    result = {}
    t = threading.Thread(target=lambda: result.update(long=cluster.generate(None, LONG, prompt_token_ids=long_prompt)))
    t.start()
    wait_for(lambda: (s := ray.get(base.stats.remote())).waiting == 1 and s.running == 0, timeout_s=30,
             what="the long prompt to wait for the pool")
    behind = []  # latencies of short requests that finished while the long prompt still waited
    while len(behind) < 40:
        dt = timed()
        st = ray.get(base.stats.remote())
        if st.pooled_total or st.running or not st.waiting:
            break  # the pool has come: the long prompt runs
        behind.append(dt)
    t.join(timeout=300)
    assert result["long"].token_ids == want_long
    assert ray.get(base.stats.remote()).pooled_total == 1 and cluster.status().size == 2  # it ran on the pool
    # A pool at rest (grown, idle) gives the same tokens, and the short request's latency alone again.
    assert cluster.generate(None, LONG, prompt_token_ids=long_prompt).token_ids == want_long
    alone += [timed() for _ in range(7)]
    # Several short requests ran and ended while the long one waited (before, they queued behind it
    # for the whole wait); at their median latency alone, within 1.5x (medians: a busy machine's
    # pauses, member start-up among them, hit single requests).
    assert len(behind) >= 3, behind
    assert statistics.median(behind) <= 1.5 * statistics.median(alone), (behind, alone)
