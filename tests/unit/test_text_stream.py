"""Incremental detokenisation gives, token by token, exactly what decoding the whole output gives."""
import random

import pytest

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.tokenizer import ByteTokenizer, HFTokenizer
from tests.helpers.checkpoints import make_llama_checkpoint

TEXTS = ["Hello, pool!", "naïve café — 東京 🚀 done", "  leading spaces\nand lines\t", "ßüñ" * 20]


def streamed(tok, ids):
    stream, parts = tok.stream(), []
    for i, t in enumerate(ids):
        parts.append(stream.step(t))
        # Every prefix of the stream is a prefix of the final text: nothing sent is taken back.
        assert tok.decode(ids).startswith("".join(parts)), (ids[: i + 1], parts)
    return "".join(parts)


def test_byte_stream_equals_whole_decode():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        assert streamed(tok, ids) == tok.decode(ids) == text
    for _ in range(200):  # arbitrary bytes, cut multi-byte characters, specials and unused ids
        ids = [rng.randrange(384) for _ in range(rng.randrange(1, 40))]
        whole, got = tok.decode(ids), streamed(tok, ids)
        assert whole.startswith(got) and len(whole) - len(got) <= 1  # at most a held-back U+FFFD


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return HFTokenizer(make_llama_checkpoint(tmp_path_factory.mktemp("llama")))


def test_hf_stream_equals_whole_decode(hf_tok):
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert streamed(hf_tok, ids) == hf_tok.decode(ids)


def test_engine_text_and_deltas_match_whole_decode_with_stop_strings():
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096))
    tok = engine.tokenizer
    prompt = [5, 17, 99, 3, 42]
    [free] = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert free.text == tok.decode(free.token_ids)
    assert len(free.text) > 13  # the tiny model's greedy output for this prompt (26 characters)
    stop = free.text[10:13]
    rid = engine.add_request(prompt_token_ids=prompt,
                             params=SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,)))
    deltas = []
    while engine.has_unfinished():
        deltas += [o.text_delta for o in engine.step().outputs if o.request_id == rid]
    assert "".join(deltas) == free.text[: free.text.find(stop)]
