"""A base's step with no pooled sequence is the local executor's own step: no plan is made before
attention runs, so a step replayed from a CUDA graph (no `attend` at all) makes none. Before, every
step built one, with a blocking host-to-device copy that waited for the GPU and undid async
scheduling (on an H200 under HTTP load, 64-sequence decode steps went from 5.10 to 4.34 ms with
this fix and the fused residual add together; the rest of the gap was the per-request streams)."""
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.attention import select_kernel
from fapool.policy import PolicyConfig, PoolCurve
from fapool.pool.pooled_attention import PooledAttention
from fapool.step_batch import SeqSlice, StepBatch

ENGINE = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096)


def test_an_all_local_step_plans_only_when_attention_runs():
    made: list[PooledAttention] = []

    def factory(loaded, cache):
        kernel = select_kernel(loaded.device, ENGINE.attention_kernel, dtype=loaded.dtype)
        made.append(PooledAttention(loaded.config, cache, kernel,
                                    PolicyConfig(curve=PoolCurve.parse("4096:1"), max_pool=1), pool_wait_s=0.0))
        return made[0]

    engine = LLMEngine(ENGINE, executor_factory=factory)
    ex = made[0]
    plans = []
    real = ex.local.rows_plan
    ex.local.rows_plan = lambda *a: plans.append(a) or real(*a)  # counts, then does the real work
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = LLMEngine(ENGINE).generate([[5, 6, 7, 8], [9, 10]], sp)
    got = engine.generate([[5, 6, 7, 8], [9, 10]], sp)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    steps = len(plans)
    assert steps > 0  # the eager steps planned, once each, when attention ran

    # A step whose forward never calls attention (what a graph replay is to the executor).
    engine.add_request(None, sp, prompt_token_ids=[3, 4, 5], request_id="r")
    assert engine.step().report.kind == "prefill"
    batch = StepBatch("decode", (SeqSlice("r", 3, 1),))  # its next step: the first token, in the prompt's page
    before = len(plans)
    ex.begin_step(batch)
    ex.end_step()
    assert len(plans) == before
    assert ex.cache.get("r").length == batch.slices[0].end  # the step's rows count as cached
