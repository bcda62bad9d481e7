"""Per-request isolation in sampling and bounded stop-string work."""
import time

import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.output import OutputProcessor
from fapool.sampling import (MAX_STOP_CHARS, MAX_STOP_STRINGS, SampleError, make_generator, sample)
from fapool.sequence import Sequence
from fapool.stops import StopMatcher
from fapool.tokenizer import load_tokenizer
from fapool.config import PRESETS

NORMAL = [SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=8),
          SamplingParams(temperature=0.0)]
HOSTILE = [SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300),
           SamplingParams(temperature=1e-300, top_p=1e-300, top_k=3)]


def gens(params):
    return [make_generator(p.seed) for p in params]


def test_tiny_temperature_and_top_p_do_not_touch_their_batch():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 30
    params = [NORMAL[0], HOSTILE[0], NORMAL[1], HOSTILE[1], NORMAL[2], HOSTILE[2]]
    got = sample(logits, params, gens(params))
    assert not any(isinstance(t, SampleError) for t in got)
    argmax = logits.argmax(-1).tolist()
    # Hostile rows are greedy: temperature under 1e-5 by rule, top_p 1e-300 keeps only the top token.
    assert [got[1], got[3], got[5]] == [argmax[1], argmax[3], argmax[5]]
    # Normal rows draw exactly what they draw without the hostile rows beside them.
    normal_rows = [0, 2, 4]
    alone = sample(logits[normal_rows], NORMAL, gens(NORMAL))
    assert [got[i] for i in normal_rows] == alone


def test_temperature_below_epsilon_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_non_finite_logits_fail_only_their_row():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    logits[1] = float("nan")  # no usable logit at all: that request fails
    logits[2, 5] = float("nan")  # one bad logit: the row falls back to greedy over the rest
    for params in ([SamplingParams(temperature=1.0, seed=1)] * 4, [SamplingParams(temperature=0)] * 4):
        got = sample(logits, params, gens(params))
        assert isinstance(got[1], SampleError) and "NaN" in got[1].message
        clean = logits[2].nan_to_num(nan=float("-inf"))
        assert got[2] == int(clean.argmax())
        assert all(isinstance(t, int) and not isinstance(t, SampleError) for t in (got[0], got[3]))


def test_a_sample_error_finishes_one_request_with_an_error():
    tok = load_tokenizer("tiny", PRESETS["tiny"])
    proc = OutputProcessor(tok)
    seq = Sequence("r1", [1, 2], SamplingParams(), make_generator(0), 0.0)
    out = proc.append(seq, SampleError("no finite logit"), 0.0)
    assert out.finished and out.finish_reason == "error" and out.error == "no finite logit"
    assert seq.output_ids == []


def test_engine_batch_with_hostile_requests_all_finish():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096))
    prompt = [5, 6, 7, 8]
    seeded = SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True)
    [alone] = engine.generate([prompt], seeded)
    hostile = [SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True),
               SamplingParams(max_tokens=8, top_p=1e-300, ignore_eos=True)]
    [greedy] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    outs = engine.generate([prompt] * 3, [hostile[0], seeded, hostile[1]])
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert outs[1].token_ids == alone.token_ids
    assert outs[0].token_ids == greedy.token_ids


def test_stop_string_caps_name_the_limit():
    SamplingParams(stop=("x" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS)
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS}"):
        SamplingParams(stop=("a",) * (MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_CHARS}"):
        SamplingParams(stop=("a" * (MAX_STOP_CHARS + 1),))
    with pytest.raises(ValueError, match=r"stop\[1\] is an empty string"):
        SamplingParams(stop=("a", ""))


def test_stop_matcher_finds_what_str_find_finds():
    g = torch.Generator().manual_seed(3)
    alphabet = "abc"
    for _ in range(300):
        stops = ["".join(alphabet[i] for i in torch.randint(0, 3, (int(torch.randint(1, 4, (1,), generator=g)),),
                                                             generator=g).tolist()) for _ in range(3)]
        text = "".join(alphabet[i] for i in torch.randint(0, 3, (12,), generator=g).tolist())
        m = StopMatcher(stops)
        # Grow the text a character at a time, as tokens arrive: the first completed match cuts.
        want = min(((text.find(s) + len(s), -len(s), text.find(s)) for s in stops if s in text), default=None)
        got = -1
        for n in range(1, len(text) + 1):
            got = m.find(text[:n], n - 1)
            if got >= 0:
                break
        assert got == (want[2] if want else -1), (stops, text)


def test_stop_matching_cost_does_not_grow_with_the_number_of_strings():
    text = "q" * 2000

    def cost(n):
        m = StopMatcher([f"{i:04d}z" for i in range(n)])
        t0 = time.perf_counter()
        for end in range(1, len(text) + 1):
            m.find(text[:end], end - 1)
        return time.perf_counter() - t0

    cost(1)  # warm up
    one, many = min(cost(1) for _ in range(3)), min(cost(MAX_STOP_STRINGS) for _ in range(3))
    assert many < 3 * one + 0.01, (one, many)
