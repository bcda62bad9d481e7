"""The elastic pool on a real local Ray cluster (CPU): exact tokens, growth, shrink, failure."""
import threading

import pytest
import ray
import torch

from actors.config import ClusterConfig
from actors.messages import GenerateRequest
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for
from tests.helpers.checkpoints import make_llama_checkpoint

CURVE = PoolCurve.parse("16:1,32:2,64:3")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_llama_checkpoint(tmp_path_factory.mktemp("llama")))


def cfg_for(model, cooldown_s=60.0, bases=1, curve=CURVE, max_pool=32, **kw):
    return ClusterConfig(
        engine=EngineConfig(model=model, device="cpu", kv_capacity_tokens=4096),
        policy=PolicyConfig(curve=curve, max_pool=max_pool, cooldown_s=cooldown_s),
        num_base_actors=bases, member_kv_capacity_tokens=4096, pool_wait_s=120.0,
        **{"max_cpu_members": 32, **kw},
    )


def prompt(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model_dir, ids, n):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def pooled_total(cluster):
    return sum(ray.get(b.stats.remote()).pooled_total for b in cluster.bases)


def test_pooled_tokens_equal_unpooled_and_transformers(start_cluster, checkpoint):
    prompts = [prompt(n, s) for s, n in enumerate((8, 20, 40, 90))]  # below, and across each threshold
    local = LLMEngine(EngineConfig(model=checkpoint, device="cpu"))
    want = [c.token_ids for c in local.generate(prompts, GREEDY)]
    for p, w in zip(prompts, want):
        assert list(w) == hf_greedy(checkpoint, p, GREEDY.max_tokens)
    cluster = start_cluster(cfg_for(checkpoint))
    got = [cluster.generate(None, GREEDY, prompt_token_ids=p).token_ids for p in prompts]
    assert got == want
    st = cluster.status()
    assert st.size == 3 and st.target == 3  # grew with the 90-token prompt
    assert pooled_total(cluster) == 3  # the three prompts over the threshold ran in the pool


def test_pool_grows_then_shrinks_after_cooldown(start_cluster):
    cluster = start_cluster(cfg_for("tiny", cooldown_s=1.5))
    assert cluster.status().size == 0
    short = cluster.generate(None, GREEDY, prompt_token_ids=prompt(3, 1))  # stays under 16 tokens
    assert cluster.status().size == 0
    p = prompt(70, 2)
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], GREEDY)[0].token_ids
    got = cluster.generate(None, GREEDY, prompt_token_ids=p)
    assert got.token_ids == want and short.completion_tokens == 12
    assert cluster.status().size == 3
    st = wait_for(lambda: (s := cluster.status()).size == 0 and s, timeout_s=30, what="pool to shrink")
    dirs = [(e.direction, e.from_size, e.to_size) for e in st.events]
    assert dirs[0] == ("up", 0, 3) and dirs[-1][0] == "down" and dirs[-1][2] == 0, st.events
    assert all(e.reason for e in st.events)


def test_shrink_never_drops_a_running_request(start_cluster):
    """A long request keeps its members while the policy wants fewer; it finishes exactly."""
    cluster = start_cluster(cfg_for("tiny", cooldown_s=0.0))
    p = prompt(70, 3)
    long_params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], long_params)[0].token_ids
    got = cluster.generate(None, long_params, prompt_token_ids=p)
    assert got.token_ids == want
    wait_for(lambda: cluster.status().size == 0, timeout_s=30, what="pool to shrink")


def test_two_bases_share_one_pool(start_cluster):
    cluster = start_cluster(cfg_for("tiny", bases=2))
    assert len(cluster.bases) == 2
    prompts = [prompt(n, 10 + i) for i, n in enumerate((70, 6, 9, 40, 66, 12))]
    ref = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    want = [c.token_ids for c in ref.generate(prompts, GREEDY)]
    results = [None] * len(prompts)

    def run(i):
        results[i] = cluster.generate(None, GREEDY, prompt_token_ids=prompts[i], base=cluster.bases[i % 2])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert [r.token_ids for r in results] == want
    per_base = [ray.get(b.stats.remote()).pooled_total for b in cluster.bases]
    assert per_base[0] >= 1 and per_base[1] >= 1  # both bases used the same pool


def test_killing_a_member_mid_request_recomputes_and_heals(start_cluster):
    cluster = start_cluster(cfg_for("tiny"))
    p = prompt(70, 20)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], params)[0].token_ids
    result = {}
    t = threading.Thread(target=lambda: result.update(r=cluster.generate(None, params, prompt_token_ids=p)))
    t.start()
    wait_for(lambda: pooled_total(cluster) >= 1, what="the request to be pooled")
    victim_id = cluster.status().members[0]
    victim = ray.get(cluster.controller.member_handle.remote(victim_id))
    ray.kill(victim)
    t.join(timeout=300)
    assert result["r"].token_ids == want and result["r"].finish_reason == "length"
    st = wait_for(lambda: (s := cluster.status()).size == 3 and victim_id not in s.members and s,
                  timeout_s=60, what="the pool to heal")
    assert any("died" in e.reason for e in st.events)
    # No shard is left behind on the surviving or new members once the request is done.
    handles = [ray.get(cluster.controller.member_handle.remote(m)) for m in st.members]
    wait_for(lambda: all(s["shards"] == 0 for s in ray.get([h.stats.remote() for h in handles])),
             timeout_s=30, what="members to hold no shards")
    # The healed pool serves pooled requests again.
    q = prompt(70, 21)
    want2 = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([q], GREEDY)[0].token_ids
    assert cluster.generate(None, GREEDY, prompt_token_ids=q).token_ids == want2


@pytest.mark.slow
def test_a_pool_of_32_members(start_cluster):
    cluster = start_cluster(cfg_for("tiny", curve=PoolCurve.parse("16:32"), data_plane_timeout_s=300.0))
    p = prompt(200, 30)
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], GREEDY)[0].token_ids
    got = cluster.generate(None, GREEDY, prompt_token_ids=p)
    assert got.token_ids == want
    st = cluster.status()
    assert st.size == 32 and len(st.members) == 32
    assert pooled_total(cluster) == 1


def test_capacity_caps_the_pool(start_cluster):
    """With one logical GPU per actor and 4 GPUs, one base leaves room for 3 members."""
    cluster = start_cluster(cfg_for("tiny", curve=PoolCurve.parse("16:8"), actor_num_gpus=1.0))
    p = prompt(30, 40)
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], GREEDY)[0].token_ids
    assert cluster.generate(None, GREEDY, prompt_token_ids=p).token_ids == want
    st = cluster.status()
    assert st.size == 3 and st.target == 3


def test_warm_standby_joins_first_and_is_refilled(start_cluster):
    cluster = start_cluster(cfg_for("tiny", cooldown_s=0.5, standby_members=1))
    wait_for(lambda: cluster.status().standby == 1, what="a warm standby member")
    p = prompt(20, 50)  # wants one member: the standby
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], GREEDY)[0].token_ids
    assert cluster.generate(None, GREEDY, prompt_token_ids=p).token_ids == want
    st = cluster.status()
    assert st.size == 1 and st.members == (1,)  # member 1 was the standby started with the cluster
    wait_for(lambda: cluster.status().standby == 1, what="the standby to be refilled")
    # Shrinking returns the drained member to standby when there is room, else stops it.
    wait_for(lambda: cluster.status().size == 0, timeout_s=30, what="the pool to shrink")
    assert cluster.status().standby == 1


def test_a_fragmented_member_never_breaks_the_group(start_cluster):
    """The base places its shards on a member itself, so it sees the member's holes: a shard that
    fits the member's free rows in sum but in no one region runs elsewhere, instead of reaching
    the member, failing there and breaking the group (a new epoch, every pooled request redone)."""
    cfg = ClusterConfig(
        engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096),
        policy=PolicyConfig(curve=PoolCurve.parse("16:1"), max_pool=1, cooldown_s=60.0),
        member_kv_capacity_tokens=200, pool_wait_s=120.0,
    )
    cluster = start_cluster(cfg)
    params = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    # A, B, C put 50 rows each on the member, in this order; aborting B leaves a hole: 100 rows
    # free in all, 50 at most in one region.
    ids = {name: prompt(100, 60 + i) for i, name in enumerate("ABC")}
    results, threads = {}, []
    for i, name in enumerate("ABC"):
        req = GenerateRequest(f"frag-{name}", params, None, tuple(ids[name]))
        t = threading.Thread(target=lambda n=name, r=req: results.update(
            {n: list(cluster.stream(r, cluster.bases[0]))}))
        t.start()
        threads.append(t)
        wait_for(lambda k=i + 1: pooled_total(cluster) >= k, what=f"request {name} to be pooled")
    ray.get(cluster.bases[0].abort.remote("frag-B"))
    threads[1].join(timeout=60)
    assert results["B"][-1].finish_reason == "abort"
    epoch = cluster.status().epoch
    d = prompt(180, 63)  # wants 90 rows on the member
    got_d = cluster.generate(None, GREEDY, prompt_token_ids=d)
    [t.join(timeout=300) for t in threads]
    ref = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    assert got_d.token_ids == ref.generate([d], GREEDY)[0].token_ids
    for name in "AC":
        tokens = [t for ev in results[name] for t in ev.new_token_ids]
        assert tokens == list(ref.generate([ids[name]], params)[0].token_ids), name
    assert cluster.status().epoch == epoch  # no group was broken and formed again
    assert pooled_total(cluster) == 3  # D ran on the base alone
