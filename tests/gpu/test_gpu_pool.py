"""The pool on GPUs over NCCL: pooled equals unpooled, and epoch changes under load lose nothing."""
import threading
import time

import pytest
import torch

from actors.cluster import Cluster
from actors.config import ClusterConfig
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def members_possible():
    return max(torch.cuda.device_count() - 1, 0) if torch.cuda.is_available() else 0


def prompt(n, seed):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def cluster(ray_gpu):
    if members_possible() < 1:
        pytest.skip("needs at least 2 GPUs")
    cfg = ClusterConfig(
        engine=EngineConfig(model="tiny", device="cuda", dtype="float32", kv_capacity_tokens=1 << 16),
        policy=PolicyConfig(PoolCurve.parse(f"64:1,256:{members_possible()}"), cooldown_s=1.0),
        pool_wait_s=120.0, member_kv_capacity_tokens=1 << 16,
    )
    with Cluster.start(cfg) as c:
        yield c


def test_fp32_pooled_tokens_equal_unpooled(cluster):
    ref = LLMEngine(EngineConfig(model="tiny", device="cuda", dtype="float32", kv_capacity_tokens=1 << 16))
    prompts = [prompt(n, i) for i, n in enumerate((20, 100, 400, 2000))]
    want = [c.token_ids for c in ref.generate(prompts, GREEDY)]
    got = [cluster.generate(None, GREEDY, prompt_token_ids=p).token_ids for p in prompts]
    assert got == want
    assert cluster.status().size == members_possible()


def test_epoch_changes_under_load_lose_no_request(cluster):
    ref = LLMEngine(EngineConfig(model="tiny", device="cuda", dtype="float32", kv_capacity_tokens=1 << 16))
    prompts = [prompt(n, 100 + i) for i, n in enumerate((30, 90, 300, 600, 70, 1200, 40, 500))]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = [c.token_ids for c in ref.generate(prompts, params)]
    results = [None] * len(prompts)

    def run(i):
        time.sleep(0.3 * i)
        results[i] = cluster.generate(None, params, prompt_token_ids=prompts[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    # Meanwhile the policy changes several times: epochs form and members drain under load.
    for size in (1, members_possible(), 1, members_possible()):
        curve = PoolCurve.parse(f"16:{size}")
        cluster.controller.reconfigure.remote(PolicyConfig(curve, cooldown_s=0.0))
        time.sleep(1.0)
    [t.join(timeout=300) for t in threads]
    assert results == want
    epochs = cluster.status().epoch
    assert epochs >= 3
