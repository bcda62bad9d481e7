"""The engine on the built-in tiny model: continuous batching, stopping, sampling, refusals."""
import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192))


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 60, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lens]


def run_alone(engine, ids, params=GREEDY):
    [c] = engine.generate([ids], params)
    return c.token_ids


def test_generate_text_quickly(engine):
    [c] = engine.generate(["Hello, pool!"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert c.completion_tokens == 16 and len(c.token_ids) == 16
    assert c.finish_reason == "length"
    assert c.prompt_tokens == len("Hello, pool!") + 1  # bytes + BOS


def test_continuous_batching_matches_each_request_alone(engine):
    ps = prompts(6)
    alone = [run_alone(engine, p) for p in ps]
    # Requests join at different steps while others decode, and leave at different lengths.
    lengths = [24, 5, 17, 24, 9, 13]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    got: dict[str, list[int]] = {}
    rid = {}
    join_at = {0: [0, 1], 3: [2], 4: [3, 4], 10: [5]}
    step = 0
    while step < 200:
        for i in join_at.get(step, []):
            rid[engine.add_request(None, params[i], prompt_token_ids=ps[i])] = i
        if not engine.has_unfinished() and step > max(join_at):
            break
        for out in engine.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert len(got) == 6
    for r, i in rid.items():
        assert got[r] == list(alone[i][: lengths[i]]), f"request {i} differs when batched"


def test_batched_generate_equals_single(engine):
    ps = prompts(5, seed=1)
    alone = [run_alone(engine, p) for p in ps]
    together = [c.token_ids for c in engine.generate(ps, GREEDY)]
    assert together == alone


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    ps = prompts(3, seed=2)
    sp = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=s, ignore_eos=True)
          for s in (1, 2, 3)]
    alone = [engine.generate([p], s)[0].token_ids for p, s in zip(ps, sp)]
    together = [c.token_ids for c in engine.generate(ps, sp)]
    assert together == alone
    assert len(set(alone)) == 3  # different seeds, different draws


def test_top_k_one_is_greedy(engine):
    p = prompts(1, seed=3)[0]
    sampled = engine.generate([p], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=0, ignore_eos=True))
    assert sampled[0].token_ids == run_alone(engine, p)[:10]


def test_stop_string_and_stop_token(engine):
    p = prompts(1, seed=4)[0]
    [full] = engine.generate([p], GREEDY)
    stop_tok = full.token_ids[5]
    [c] = engine.generate([p], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_tok,), ignore_eos=True))
    assert c.finish_reason == "stop" and c.token_ids[-1] == stop_tok
    assert len(c.token_ids) == full.token_ids.index(stop_tok) + 1
    text = full.text
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2]), None)
    if stop:
        [c] = engine.generate([p], SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,), ignore_eos=True))
        assert c.finish_reason == "stop" and c.text == text[: text.find(stop)]


def test_eos_stops_unless_ignored(engine):
    eos = engine.tokenizer.eos_token_ids[0]
    # Find a prompt whose greedy continuation reaches a chosen token, then call that token EOS.
    p = prompts(1, seed=5)[0]
    [full] = engine.generate([p], GREEDY)
    engine.outputs.eos_ids = frozenset({full.token_ids[3]})
    try:
        [c] = engine.generate([p], SamplingParams(max_tokens=24, temperature=0.0))
        assert c.finish_reason == "stop" and len(c.token_ids) == full.token_ids.index(full.token_ids[3]) + 1
    finally:
        engine.outputs.eos_ids = frozenset({eos})


def test_preemption_under_page_pressure_keeps_every_request_exact():
    # 96 rows (6 pages of 16): four requests of 30 + 20 tokens cannot all hold their pages at once.
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=100))
    ps = prompts(4, seed=6)
    ps = [p[:30] + [1] * (30 - len(p[:30])) for p in ps]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [engine.generate([p], sp)[0].token_ids for p in ps]
    got: dict[str, list[int]] = {}
    rids = [engine.add_request(None, sp, prompt_token_ids=p) for p in ps]
    max_running = 0
    while engine.has_unfinished():
        for out in engine.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        st = engine.stats()
        max_running = max(max_running, st.running)
        assert st.kv_used_tokens <= st.kv_capacity_tokens
    assert max_running >= 2  # pages are taken as sequences grow, not for their whole life
    assert engine.stats().num_preemptions > 0
    assert [tuple(got[r]) for r in rids] == alone
    assert engine.stats().kv_used_tokens == 0


def test_a_request_holds_pages_only_for_the_tokens_it_has():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192, max_model_len=8192))
    rid = engine.add_request(None, SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True),
                             prompt_token_ids=[5] * 20)
    tokens = [t for _ in range(10) for out in engine.step().outputs for t in out.new_token_ids]
    assert len(tokens) == 10
    st = engine.stats()
    assert st.request_ids == (rid,) and st.contexts == (30,)
    assert st.kv_used_tokens <= 30 + st.kv_page_size  # about 30 rows, not 20 + 4096
    engine.abort(rid)
    assert engine.stats().kv_used_tokens == 0


def test_chunked_prefill_gives_the_same_tokens_and_keeps_streams_going():
    small = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192, max_prefill_tokens=64))
    big = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192, max_prefill_tokens=100000))
    ps = prompts(3, seed=11)
    long_prompt = prompts(1, seed=12)[0] * 12  # several chunks of 64
    want = [c.token_ids for c in big.generate(ps + [long_prompt], GREEDY)]
    rids = [small.add_request(None, GREEDY, prompt_token_ids=p) for p in ps]
    got: dict[str, list[int]] = {}
    for _ in range(3):
        for out in small.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    rids.append(small.add_request(None, GREEDY, prompt_token_ids=long_prompt))
    chunk_steps = 0
    while small.has_unfinished():
        unfinished_short = set(rids[:3]) & set(small.stats().request_ids)
        step = small.step()
        outs = step.outputs
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        batch = step.report.batch
        assert batch.num_tokens <= 64 + len(ps)
        if any(s.seq_id == rids[-1] and s.num_tokens > 1 for s in batch.slices):
            chunk_steps += 1
            # A step with a chunk of the long prompt still gives every short stream its token.
            assert unfinished_short <= {o.request_id for o in outs if o.new_token_ids}
    assert chunk_steps >= len(long_prompt) // 64
    assert [tuple(got[r]) for r in rids] == want


def test_request_that_can_never_fit_is_refused_at_once():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=64, max_model_len=128))
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(None, SamplingParams(max_tokens=40), prompt_token_ids=[1] * 30)
    with pytest.raises(ValueError, match="context of 128"):
        engine.add_request(None, SamplingParams(max_tokens=100), prompt_token_ids=[1] * 30)
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [1, 99999]}, "99999"),
        ({"prompt_token_ids": [1, -1]}, "-1"),
        ({}, "exactly one"),
    ],
)
def test_bad_prompts(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(None, SamplingParams(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"stop": ("",)}, "stop")],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_abort_frees_kv(engine):
    rid = engine.add_request("abc", SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().kv_used_tokens > 0
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats().kv_used_tokens == 0 and not engine.has_unfinished()


def test_recompute_gives_the_same_tokens(engine):
    p = prompts(1, seed=7)[0]
    want = run_alone(engine, p)
    rid = engine.add_request(None, GREEDY, prompt_token_ids=p)
    got = []
    for i in range(40):
        if i == 6:
            engine.recompute([rid])  # as after losing the pool member with its KV
        for out in engine.step().outputs:
            got += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert got == list(want)


def stepped_engine(**kw):
    """An engine whose local decode steps run whole through the step-graph path, eagerly (no CUDA
    here), with async scheduling: tokens reach the caller one step late."""
    e = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192, max_model_len=512, **kw))
    e.use_step_graphs(capture=False)
    return e


def test_async_decode_gives_the_same_tokens_one_step_late(engine):
    async_engine = stepped_engine()
    assert async_engine.runner.async_decode is not None
    ps = prompts(6, seed=21)
    lengths = [24, 5, 17, 24, 9, 13]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    want = [c.token_ids for c in engine.generate(ps, params)]
    got: dict[str, list[int]] = {}
    rid, join_at, step, blind = {}, {0: [0, 1], 3: [2], 4: [3, 4], 10: [5]}, 0, 0
    while step < 300 and (async_engine.has_unfinished() or step <= max(join_at)):
        for i in join_at.get(step, []):
            rid[async_engine.add_request(None, params[i], prompt_token_ids=ps[i])] = i
        for out in async_engine.step().outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        blind += async_engine.runner.in_flight
        step += 1
    assert blind > 10  # most decode steps really ran ahead of their tokens
    for r, i in rid.items():
        assert tuple(got[r]) == want[i], f"request {i} differs with async decode"
    assert async_engine.stats().kv_used_tokens == 0


def test_async_decode_stops_exactly_and_aborts_in_flight(engine):
    e = stepped_engine()
    p = prompts(1, seed=22)[0]
    full = run_alone(engine, p)
    stop_tok = full[5]
    sp = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_tok,))
    [c] = e.generate([p], sp)
    assert c.token_ids == full[: full.index(stop_tok) + 1] and c.finish_reason == "stop"
    rid = e.add_request(None, GREEDY, prompt_token_ids=p)
    got = []
    for _ in range(6):
        got += [t for o in e.step().outputs for t in o.new_token_ids]
    assert e.runner.in_flight
    out = e.abort(rid)
    assert out.finish_reason == "abort"
    while e.has_unfinished():
        assert not [o for o in e.step().outputs if o.new_token_ids]  # the step in flight is dropped
    assert got == list(full[: len(got)]) and e.stats().kv_used_tokens == 0


def test_sampled_requests_take_the_synchronous_step_path_with_the_same_tokens(engine):
    ps = prompts(3, seed=23)
    sp = [SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=s) for s in (1, 2, 3)]
    want = [c.token_ids for c in engine.generate(ps, sp)]
    e = stepped_engine()
    assert [c.token_ids for c in e.generate(ps, sp)] == want
