"""The core's side of vLLM's extra fields: min_p in the sampler, stop strings kept in the text,
special tokens kept, a token's raw bytes (also part of a character), template variables."""
from __future__ import annotations

import json

import torch

from fapool.output import OutputProcessor
from fapool.sampling import SamplingParams, _probs
from fapool.sequence import Sequence
from fapool.tokenizer import ByteTokenizer, HFTokenizer, render_chat_template
from tests.helpers.checkpoints import build_bpe_tokenizer


def test_min_p_drops_what_is_less_likely_than_min_p_times_the_top():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = _probs(logits, SamplingParams(min_p=0.5))
    assert probs.tolist()[2:] == [0.0, 0.0] and probs[0] > 0 and probs[1] > 0
    assert (_probs(logits, SamplingParams()) > 0).all()


def run(params: SamplingParams, ids: list[int]) -> str:
    out = OutputProcessor(ByteTokenizer())
    seq = Sequence("r", [65], params, torch.Generator(), 0.0)
    for i, t in enumerate(ids):
        out.append(seq, t, float(i))
        if seq.finish_reason:
            break
    return seq.text


def test_include_stop_str_and_skip_special_tokens():
    ids = list(b"abcXYdef")
    assert run(SamplingParams(max_tokens=8, stop=["XY"]), ids) == "abc"
    assert run(SamplingParams(max_tokens=8, stop=["Y", "XY"], include_stop_str_in_output=True), ids) == "abcXY"
    assert run(SamplingParams(max_tokens=8), [104, 105, 257]) == "hi"
    assert run(SamplingParams(max_tokens=8, skip_special_tokens=False), [104, 105, 257]) == "hi</s>"


def test_token_bytes_of_part_of_a_character(tmp_path):
    assert ByteTokenizer().token_bytes(0xE2) == b"\xe2"
    tok = build_bpe_tokenizer(["<s>", "</s>"], bos="<s>")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    hf = HFTokenizer(tmp_path)
    euro = hf.encode("€", add_special_tokens=False)  # three bytes; the tiny BPE keeps some apart
    assert b"".join(hf.token_bytes(t) for t in euro) == "€".encode()
    assert hf.token_bytes(hf.encode("a", add_special_tokens=False)[0]) == b"a"


def test_chat_template_kwargs_reach_the_template():
    template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat_template(template, msgs, True, {"enable_thinking": True}) == "<think>hi"
    assert ByteTokenizer().apply_chat_template(msgs, False, enable_thinking=True).endswith("hi\n")
