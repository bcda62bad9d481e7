"""The bench.elastic replay and a real CPU cluster's controller make the same pool sizes on one trace."""
from actors.config import ClusterConfig
from bench.elastic.costs import load
from bench.elastic.replay import Setup, replay
from bench.elastic.workloads import Request
from fapool import EngineConfig, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for

POLICY = PolicyConfig(curve=PoolCurve.parse("16:1,32:2,64:3"), max_pool=32, cooldown_s=0.5)
PROMPTS = (20, 70, 5, 40)  # want 1, 3, 0 and 2 members
OUT = 4


def test_replay_makes_the_same_pool_sizes_as_a_real_controller(start_cluster):
    cluster = start_cluster(ClusterConfig(
        engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096), policy=POLICY,
        num_base_actors=1, member_kv_capacity_tokens=4096, pool_wait_s=120.0, max_cpu_members=32))
    params = SamplingParams(max_tokens=OUT, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(PROMPTS):  # one at a time, each after the pool has settled
        cluster.generate(None, params, prompt_token_ids=[3 + (i + j) % 200 for j in range(n)])
        wait_for(lambda: cluster.status().size == 0, timeout_s=60, what="pool to drain")
    real = [0] + [e.to_size for e in cluster.status().events]

    trace = [Request(30.0 * i, n, OUT) for i, n in enumerate(PROMPTS)]
    replayed = replay(Setup("cpu", POLICY, num_bases=1), trace, load())
    assert [n for _, n in replayed.pool_sizes] == real == [0, 1, 0, 3, 0, 2, 0]
