"""Supervision on a real local Ray cluster (CPU): status calls never wait on (or break) the engine,
clusters never touch each other, and a killed base or controller comes back and rejoins."""
import threading
import time

import pytest
import ray

from actors.cluster import Cluster
from actors.config import ClusterConfig
from actors.messages import GenerateRequest
from actors.supervisor import base_name
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG_PREFILL = 12000  # tokens: a prefill step of several seconds on CPU


def cfg(curve="16:1", max_pool=32, **kw):
    return ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=16384),
                         policy=PolicyConfig(curve=PoolCurve.parse(curve), max_pool=max_pool, cooldown_s=60.0),
                         member_kv_capacity_tokens=4096, pool_wait_s=60.0, **kw)


@pytest.fixture(scope="module")
def reference():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    return lambda ids, params=GREEDY: list(engine.generate([ids], params)[0].token_ids)


def ids_of(n, seed):
    return [3 + (seed * 7919 + i * 104729) % 250 for i in range(n)]


def collect(cluster, req, base=None):
    """Run a request in a thread; the result dict gets 'events' or 'error'."""
    out = {}

    def run():
        try:
            out["events"] = list(cluster.stream(req, base))
        except Exception as e:  # noqa: BLE001 - what the test asserts on
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_status_never_waits_for_a_step_and_a_cancelled_command_never_stops_the_engine(start_cluster, reference):
    cluster = start_cluster(cfg(max_pool=0))
    base = cluster.bases[0]
    long_req = GenerateRequest("long", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                               None, tuple(ids_of(LONG_PREFILL, 1)))
    t, out = collect(cluster, long_req)
    wait_for(lambda: (s := ray.get(base.stats.remote())).running + s.waiting == 1, what="the long request")
    time.sleep(0.5)  # into the prefill step
    t0 = time.monotonic()
    stats = ray.get(base.stats.remote(), timeout=2)  # answered mid-prefill, from before the step
    assert stats.running + stats.waiting == 1 and time.monotonic() - t0 < 2
    assert "events" not in out  # still prefilling
    # A command whose caller gives up while the engine is busy (the dashboard aborts a slow /pool).
    for _ in range(3):
        ref = base.seqs_per_member.remote()
        time.sleep(0.2)
        ray.cancel(ref)
    t.join(timeout=300)
    assert out["events"][-1].finish_reason == "length"
    ids = ids_of(9, 2)
    assert cluster.generate(None, GREEDY, prompt_token_ids=ids).token_ids == tuple(reference(ids))
    assert ray.get(base.seqs_per_member.remote(), timeout=10) == {}  # commands still answered


def test_a_job_cluster_never_touches_another(start_cluster, reference):
    app = start_cluster(cfg())
    with Cluster.start(cfg()) as job:  # what bench.run and serve.batch do
        assert job.name != app.name
        assert job.generate(None, GREEDY, prompt_token_ids=ids_of(5, 3)).completion_tokens == 8
    with pytest.raises(ValueError, match="already running"):
        Cluster.start(cfg(), name=app.name)  # a name in use is never joined by accident
    joined = Cluster.join(app.name)  # ... only on purpose; its shutdown leaves the cluster alone
    joined.shutdown()
    ids = ids_of(20, 4)  # pooled: the app's controller and members are intact
    assert app.generate(None, GREEDY, prompt_token_ids=ids).token_ids == tuple(reference(ids))
    assert app.status().size == 1


def test_a_killed_base_fails_its_requests_at_once_and_rejoins(start_cluster, reference):
    cluster = start_cluster(cfg())
    ids = ids_of(20, 5)
    assert cluster.generate(None, GREEDY, prompt_token_ids=ids).token_ids == tuple(reference(ids))
    epoch = cluster.status().epoch
    slow = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
    threads = [collect(cluster, GenerateRequest(f"doomed-{i}", slow, None, tuple(ids_of(10 + 10 * i, 6 + i))))
               for i in range(3)]
    wait_for(lambda: ray.get(cluster.bases[0].stats.remote()).running == 3, what="three running requests")
    old = cluster.bases[0]
    t0 = time.monotonic()
    ray.kill(old)  # dead for good: the supervisor creates it again
    for t, _ in threads:
        t.join(timeout=30)
    assert time.monotonic() - t0 < 15, "requests on a dead base must end at once"
    assert all(isinstance(out.get("error"), ray.exceptions.RayActorError) for _, out in threads)
    # Back within 30 s, under its old name, in a new epoch with the pool, with no stale contexts.
    wait_for(lambda: cluster.bases[0] is not old and cluster.supervisor.healthy[0], timeout_s=30,
             what="the base to be created again")
    assert ray.get_actor(base_name(cluster.name, 0), namespace="fapool") is not None
    wait_for(lambda: cluster.status().epoch > epoch, timeout_s=30, what="a new epoch")
    assert cluster.status().contexts == ()
    got = cluster.generate(None, GREEDY, prompt_token_ids=ids)
    assert got.token_ids == tuple(reference(ids))
    assert ray.get(cluster.bases[0].stats.remote()).pooled_total == 1  # the new base uses the pool


def test_a_killed_controller_keeps_the_bases_and_comes_back(start_cluster, reference):
    cluster = start_cluster(cfg())
    base = cluster.bases[0]
    before = ray.get(base.ping.remote())
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    ids = ids_of(30, 8)
    t, out = collect(cluster, GenerateRequest("survivor", params, None, tuple(ids)))
    wait_for(lambda: ray.get(base.stats.remote()).pooled == 1, what="the request to be pooled")
    old = cluster.controller
    ray.kill(old, no_restart=False)  # a crash: Ray restarts it, the supervisor re-attaches the bases
    t.join(timeout=300)
    # Its pool members died with it: the base recomputed the request, tokens unchanged.
    assert [x for ev in out["events"] for x in ev.new_token_ids] == reference(ids, params)
    assert ray.get(base.ping.remote()) == before  # the same base process all along
    wait_for(lambda: ray.get(cluster.controller.ping.remote())[1], timeout_s=30, what="the controller to attach")
    ray.kill(cluster.controller)  # dead for good: the supervisor creates a new one
    wait_for(lambda: cluster.controller is not old and ray.get(cluster.controller.ping.remote(), timeout=5)[1],
             timeout_s=30, what="a new controller")
    assert ray.get(base.ping.remote()) == before
    q = ids_of(25, 9)
    assert cluster.generate(None, GREEDY, prompt_token_ids=q).token_ids == tuple(reference(q))
    assert cluster.status().size == 1  # the new controller grew a pool for it


def test_cpu_pool_is_bounded_by_free_cores(start_cluster, reference):
    """2 CPUs, one base: one member at most, whatever the curve asks (16 here)."""
    cluster = start_cluster(cfg(curve="16:16"))
    ids = ids_of(40, 10)
    assert cluster.generate(None, GREEDY, prompt_token_ids=ids).token_ids == tuple(reference(ids))
    st = cluster.status()
    assert st.capacity == 1 and st.size == 1 and st.target == 1


def test_one_of_two_bases_dies_the_other_keeps_its_pooled_request(start_cluster, reference):
    cluster = start_cluster(cfg(num_base_actors=2, max_cpu_members=1))  # 2 cores, 2 bases: none by default
    b0, b1 = cluster.bases
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = ids_of(30, 11)
    t, out = collect(cluster, GenerateRequest("on-b0", params, None, tuple(ids)), base=b0)
    wait_for(lambda: ray.get(b0.stats.remote()).pooled == 1, what="the request to be pooled on base 0")
    epoch = cluster.status().epoch
    ray.kill(b1)
    t.join(timeout=300)
    assert [x for ev in out["events"] for x in ev.new_token_ids] == reference(ids, params)
    wait_for(lambda: cluster.bases[1] is not b1 and cluster.supervisor.healthy[1] and cluster.status().epoch > epoch,
             timeout_s=30, what="base 1 to rejoin in a new epoch")
    q = ids_of(22, 12)
    got = cluster.generate(None, GREEDY, prompt_token_ids=q, base=cluster.bases[1])
    assert got.token_ids == tuple(reference(q))
    assert ray.get(cluster.bases[1].stats.remote()).pooled_total == 1  # the new base 1 shares the pool
