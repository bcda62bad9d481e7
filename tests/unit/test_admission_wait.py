"""A long prompt waiting for a growing pool waits aside (issue 21): requests behind it are admitted
and run on the base meanwhile, and it still starts within `pool_wait_s`, on the base alone when
no pool came, with the tokens a plain engine gives. The check that holds it back is pure."""
import time

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.attention import select_kernel
from fapool.policy import PolicyConfig, PoolCurve
from fapool.pool.pooled_attention import PooledAttention

ENGINE = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
WAIT_S = 1.0


def pooled_engine(wait_s=WAIT_S):
    made: list[PooledAttention] = []

    def factory(loaded, cache):
        kernel = select_kernel(loaded.device, ENGINE.attention_kernel, dtype=loaded.dtype)
        # Prompts of 64+ tokens want 2 members; the cluster could give them (capacity 2), none has come.
        made.append(PooledAttention(loaded.config, cache, kernel, PolicyConfig(curve=PoolCurve.parse("64:2"), max_pool=2),
                                    pool_wait_s=wait_s))
        made[0].set_capacity(2)
        return made[0]

    return LLMEngine(ENGINE, executor_factory=factory), made


def test_requests_behind_a_prompt_waiting_for_the_pool_run_and_it_starts_within_the_wait():
    engine, [ex] = pooled_engine()
    long_prompt, shorts = list(range(3, 103)), [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    want = {tuple(p): c.token_ids for p, c in zip([long_prompt, *shorts],
                                                  LLMEngine(ENGINE).generate([long_prompt, *shorts], GREEDY))}
    t0 = time.monotonic()
    long_id = engine.add_request(None, GREEDY, prompt_token_ids=long_prompt)
    ids = {engine.add_request(None, GREEDY, prompt_token_ids=p): tuple(p) for p in shorts}
    ids[long_id] = tuple(long_prompt)
    got: dict[str, list[int]] = {r: [] for r in ids}
    steps = []  # (seconds since the long prompt came, the step's request ids)
    while engine.has_unfinished():
        began = time.monotonic() - t0
        step = engine.step()
        for out in step.outputs:
            got[out.request_id] += out.new_token_ids
        if step.report is None:
            time.sleep(0.01)  # nothing could run: the long prompt waits (the base's thread would block on its inbox)
        else:
            steps.append((began, {s.seq_id for s in step.report.batch.slices}))
    assert {r: tuple(t) for r, t in got.items()} == {r: want[p] for r, p in ids.items()}
    # The first step admitted the short requests that came after the long one, not it.
    assert steps[0][1] == set(ids) - {long_id}
    # It started at the first step after the wait, on the base alone (no pool came).
    first = next(i for i, (_, rids) in enumerate(steps) if long_id in rids)
    assert steps[first][0] >= WAIT_S and all(t < WAIT_S for t, _ in steps[:first])
    assert ex.stats().pooled_total == 0


def test_the_check_that_holds_a_prompt_back_changes_nothing():
    engine, [ex] = pooled_engine()
    assert ex.plan("a", 100, 0.0) is None and ex.plan("a", 100, 0.0) is None  # pure: asked twice, the same
    assert ex.plan("a", 100, WAIT_S).shards is None  # waited long enough: every row local
    assert ex.plan("b", 20, 0.0).local_rows == 20  # below the curve: never held back
    assert engine.stats().running == engine.stats().waiting == 0
