"""Logprobs, prompt logprobs, penalties, logit_bias and min_tokens in the engine, checked against a
whole-sequence reference forward of the tiny model and the processors' definitions."""
import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.reference import penalized, reference_logits

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 68, 69, 70, 71, 72, 73]
EOS = 257  # the tiny tokenizer's </s>


@pytest.fixture(scope="module")
def engine():
    # A prefill budget of 8 tokens: the prompt is prefilled over three chunks.
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096, max_prefill_tokens=8))


def greedy(**kw):
    return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **kw})


def test_logprobs_are_log_softmax_of_the_reference_logits(engine):
    [plain] = engine.generate([PROMPT], greedy())
    [c] = engine.generate([PROMPT], greedy(logprobs=5, prompt_logprobs=3))
    assert c.token_ids == plain.token_ids  # asking for logprobs changes no token
    ref = torch.log_softmax(reference_logits(engine.model, PROMPT + list(c.token_ids)), -1)
    assert len(c.logprobs) == len(c.token_ids) == 12
    for j, lp in enumerate(c.logprobs):
        row = ref[len(PROMPT) - 1 + j]
        assert lp.token_id == c.token_ids[j]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top_v, top_i = row.topk(5)
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
    # Echo: entry p is the logprob of prompt token p given the tokens before it (chunked prefill).
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        lp = c.prompt_logprobs[p]
        assert lp.token_id == PROMPT[p]
        assert lp.logprob == pytest.approx(float(ref[p - 1, PROMPT[p]]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[p - 1].topk(3).indices.tolist()


def test_sampled_logprobs_are_of_the_raw_distribution(engine):
    params = SamplingParams(max_tokens=6, temperature=1.5, seed=11, logprobs=0, ignore_eos=True,
                            presence_penalty=1.0)
    [c] = engine.generate([PROMPT], params)
    ref = torch.log_softmax(reference_logits(engine.model, PROMPT + list(c.token_ids)), -1)
    got = [lp.logprob for lp in c.logprobs]
    want = [float(ref[len(PROMPT) - 1 + j, t]) for j, t in enumerate(c.token_ids)]
    assert got == pytest.approx(want, abs=1e-4) and all(lp.top == () for lp in c.logprobs)


@pytest.mark.parametrize("kw", [{"repetition": 2.0}, {"frequency": 2.0}, {"presence": 2.0},
                                {"bias": {65: 5.0, 10: -100.0}}])
def test_each_processor_changes_tokens_as_its_definition_says(engine, kw):
    names = {"repetition": "repetition_penalty", "frequency": "frequency_penalty", "presence": "presence_penalty"}
    params = {names[k]: v for k, v in kw.items() if k in names}
    if "bias" in kw:
        params["logit_bias"] = tuple(kw["bias"].items())
    [c] = engine.generate([PROMPT], greedy(**params))
    [plain] = engine.generate([PROMPT], greedy())
    out: list[int] = []
    for _ in range(12):  # the reference: greedy over the processed reference logits, token by token
        row = reference_logits(engine.model, PROMPT + out)[-1]
        out.append(int(penalized(row, PROMPT, out, **kw).argmax()))
    assert list(c.token_ids) == out
    assert c.token_ids != plain.token_ids


def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    eos_first = SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((EOS, 100.0),))
    [c] = engine.generate([PROMPT], eos_first)
    assert c.token_ids == (EOS,) and c.finish_reason == "stop"
    [c] = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((EOS, 100.0),),
                                                   min_tokens=5))
    assert len(c.token_ids) == 6 and EOS not in c.token_ids[:5] and c.token_ids[5] == EOS
    stop = SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((65, 100.0),), stop_token_ids=(65,),
                          min_tokens=3, ignore_eos=True)
    [c] = engine.generate([PROMPT], stop)
    assert len(c.token_ids) == 4 and 65 not in c.token_ids[:3] and c.token_ids[3] == 65
    assert c.finish_reason == "stop"


def test_requests_that_need_logits_are_marked():
    assert not SamplingParams(temperature=0).needs_logits
    for kw in ({"logprobs": 0}, {"prompt_logprobs": 0}, {"min_tokens": 1}, {"logit_bias": ((1, 1.0),)},
               {"repetition_penalty": 1.1}, {"presence_penalty": 0.1}, {"frequency_penalty": 0.1}):
        assert SamplingParams(temperature=0, **kw).needs_logits, kw
    assert SamplingParams(temperature=1.0).needs_logits


@pytest.mark.parametrize("kw,match", [({"logprobs": 21}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"min_tokens": 100, "max_tokens": 5}, "min_tokens"),
                                      ({"logit_bias": ((1, 200.0),)}, "logit_bias")])
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request(None, SamplingParams(logit_bias=((10**6, 1.0),)), prompt_token_ids=[1, 2])


def test_greedy_requests_that_need_logits_keep_off_the_async_path(engine):
    """On the async captured path a greedy token never reaches the host as logits: a request with
    logprobs or a processor must take the synchronous step, and get what the plain engine gives."""
    e = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096, max_model_len=512))
    e.use_step_graphs(capture=False)
    assert e.runner.async_decode is not None
    params = [greedy(logprobs=2), greedy(presence_penalty=1.5), greedy()]
    want = engine.generate([PROMPT] * 3, params)
    rids = [e.add_request(None, p, prompt_token_ids=PROMPT) for p in params]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    lps: dict[str, list] = {r: [] for r in rids}
    while e.has_unfinished():
        step = e.step()
        for out in step.outputs:
            tokens[out.request_id] += out.new_token_ids
            lps[out.request_id] += out.logprobs
        # Never a step in flight while a request that needs logits runs.
        assert not e.runner.in_flight or not set(e.stats().request_ids) & {rids[0], rids[1]}
    assert [tuple(tokens[r]) for r in rids] == [c.token_ids for c in want]
    assert [lp.logprob for lp in lps[rids[0]]] == pytest.approx([lp.logprob for lp in want[0].logprobs], abs=1e-5)
