"""Chaos on a real local Ray cluster (CPU): 100 scale events and 10 killed pool members while short
requests keep flowing. No request is lost or hangs, and every one has exactly its unfaulted
greedy tokens."""
import threading
import time

import ray

from actors.config import ClusterConfig
from actors.messages import GenerateRequest
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for

ROUNDS = 50  # each grows the pool 0 -> 1 and shrinks it back: two scale events
KILL_EVERY = 5  # rounds: 10 members killed mid-request
SHORT = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def ids_of(n, seed):
    return tuple(3 + (seed * 7919 + i * 104729) % 250 for i in range(n))


def run_request(cluster, req, out, key):
    try:
        out[key] = [t for ev in cluster.stream(req) for t in ev.new_token_ids]
    except Exception as e:  # noqa: BLE001 - recorded, asserted on below
        out[key] = e


def test_100_scale_events_and_10_killed_members_under_load(start_cluster):
    # Caching off: its long prompts repeat, and a cached prompt runs on its base, not the pool.
    cfg = ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192, prefix_caching=False),
                        policy=PolicyConfig(curve=PoolCurve.parse("16:1"), max_pool=1, cooldown_s=0.0),
                        member_kv_capacity_tokens=4096, pool_wait_s=60.0, standby_members=1, max_cpu_members=1)
    cluster = start_cluster(cfg)
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    shorts = [ids_of(4 + i % 5, 100 + i) for i in range(5)]
    longs = [ids_of(20 + i % 7, 200 + i) for i in range(7)]
    want = {p: list(engine.generate([list(p)], SHORT)[0].token_ids) for p in shorts}
    want.update({p: list(engine.generate([list(p)], LONG)[0].token_ids) for p in longs})

    # Load: short requests back to back on the same base, all the while.
    load: dict = {}
    stop = threading.Event()

    def keep_busy():
        n = 0
        while not stop.is_set():
            p = shorts[n % len(shorts)]
            run_request(cluster, GenerateRequest(f"short-{n}", SHORT, None, p), load, (n, p))
            n += 1

    loader = threading.Thread(target=keep_busy)
    loader.start()
    counts0 = ray.get(cluster.controller.scale_counts_total.remote())
    t0, results, kills = time.monotonic(), {}, 0
    try:
        for k in range(ROUNDS):
            p = longs[k % len(longs)]
            t = threading.Thread(target=run_request,
                                 args=(cluster, GenerateRequest(f"long-{k}", LONG, None, p), results, (k, p)))
            t.start()
            if k % KILL_EVERY == KILL_EVERY - 1:
                wait_for(lambda: ray.get(cluster.bases[0].stats.remote()).pooled == 1 or not t.is_alive(),
                         what="the long request to be pooled")
                members = cluster.status().members
                if t.is_alive() and members:
                    ray.kill(ray.get(cluster.controller.member_handle.remote(members[0])))
                    kills += 1
            t.join(timeout=120)
            assert not t.is_alive(), f"round {k}: the long request hangs"
            wait_for(lambda: cluster.status().size == 0, timeout_s=60, what=f"round {k}: the pool to shrink")
    finally:
        stop.set()
        loader.join(timeout=120)
    assert not loader.is_alive(), "a short request hangs"
    counts = ray.get(cluster.controller.scale_counts_total.remote())
    events = counts["up"] - counts0["up"] + counts["down"] - counts0["down"]
    for (k, p), got in results.items():
        assert got == want[p], f"long request {k}: {got!r}"
    for (n, p), got in load.items():
        assert got == want[p], f"short request {n}: {got!r}"
    pooled = ray.get(cluster.bases[0].stats.remote()).pooled_total
    print(f"{events} scale events, {kills} members killed, {len(results)} long and {len(load)} short "
          f"requests, {pooled} pooled, in {time.monotonic() - t0:.0f}s")
    assert len(results) == ROUNDS and kills >= 8 and events >= 2 * ROUNDS and pooled >= ROUNDS
