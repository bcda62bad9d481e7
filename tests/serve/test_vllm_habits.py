"""What vLLM users send, against the session's real `fapool serve`, through the official `openai`
client: vLLM's defaults and extra fields applied as vLLM applies them, `--served-model-name`, and
the request bodies of `vllm bench serve` and lm-eval's `local-completions` (recorded in
fixtures/client_bodies.json) run unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from fapool.tokenizer import ByteTokenizer

BODIES = json.loads((Path(__file__).parent / "fixtures" / "client_bodies.json").read_text())
TOK = ByteTokenizer()
EOS, E2 = 257, 0xE2  # the byte tokenizer's </s>, and a byte that starts a 3-byte UTF-8 character


@pytest.fixture(scope="module")
def oa(fapool_server):
    return openai.OpenAI(base_url=fapool_server + "/v1", api_key="none", max_retries=0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def test_served_model_names(oa):
    """The session server runs with `--served-model-name tiny tiny-alias`: both are models, either
    is accepted, responses carry the first (as vLLM's)."""
    assert [m.id for m in oa.models.list().data] == ["tiny", "tiny-alias"]
    assert oa.models.retrieve("tiny-alias").vocab_size == TOK.vocab_size
    c = oa.completions.create(model="tiny-alias", prompt="Hi", max_tokens=2, temperature=0)
    assert c.model == "tiny" and c.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="tiny-other", prompt="Hi", max_tokens=2)


def test_completions_stop_at_16_without_max_tokens(oa):
    c = oa.completions.create(model="tiny", prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 16 and c.choices[0].finish_reason == "length"


def test_echo_with_max_tokens_0_scores_the_prompt(oa, fapool_server):
    ids = TOK.encode("The pool")  # short: prompt + 1 stays below the pool curve's first point (16)
    c = oa.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch = c.choices[0]
    assert ch.text == TOK.decode(ids) and c.usage.completion_tokens == 0 and c.usage.prompt_tokens == len(ids)
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    # The same numbers as /generate's prompt_logprobs of those ids.
    g = post(fapool_server, "/generate", {"prompt_token_ids": ids, "max_tokens": 1, "prompt_logprobs": 1}).json()
    assert lp.token_logprobs[1:] == pytest.approx([e["logprob"] for e in g["prompt_logprobs"][1:]], abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model="tiny", prompt="x", max_tokens=0)


def test_min_p_include_stop_str_and_special_tokens(oa):
    greedy = oa.completions.create(model="tiny", prompt="Pool", max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
    # min_p 1 keeps only the most likely token: sampling at temperature 1 is then greedy.
    sampled = oa.completions.create(model="tiny", prompt="Pool", max_tokens=10, temperature=1.0, seed=3,
                                    extra_body={"ignore_eos": True, "min_p": 1.0}).choices[0].text
    assert sampled == greedy
    # logit_bias makes the text "aaaa...": a stop string "aaa" ends it at once, kept or not.
    kw = {"model": "tiny", "prompt": "Pool", "max_tokens": 10, "temperature": 0, "stop": ["aaa"],
          "logit_bias": {str(ord("a")): 100}}
    cut = oa.completions.create(**kw)
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 3
    kept = oa.completions.create(**kw, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "aaa" and kept.choices[0].finish_reason == "stop"
    # EOS forced by logit_bias: skipped from the text by default, kept with skip_special_tokens false.
    force = {"model": "tiny", "prompt": "Pool", "max_tokens": 3, "temperature": 0, "logit_bias": {str(EOS): 100}}
    assert oa.completions.create(**force).choices[0].text == ""
    assert oa.completions.create(**force, extra_body={"skip_special_tokens": False,
                                                      "spaces_between_special_tokens": False}).choices[0].text == "</s>"
    chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                      temperature=0, logit_bias={str(EOS): 100},
                                      extra_body={"skip_special_tokens": False})
    assert chat.choices[0].message.content == "</s>"


def test_chat_template_controls(oa):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The po"}]

    def prompt_tokens(**extra) -> int:
        return oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, temperature=0,
                                          extra_body=extra).usage.prompt_tokens

    full = TOK.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt_tokens() == len(TOK.encode(full, add_special_tokens=False))
    assert prompt_tokens(add_generation_prompt=False) == len(full) - len("<|assistant|>\n")
    cont = TOK.apply_chat_template(msgs, add_generation_prompt=False)
    assert prompt_tokens(add_generation_prompt=False, continue_final_message=True) == cont.rindex("The po") + 6
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == len(full)  # a variable it ignores
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        prompt_tokens(continue_final_message=True)
    with pytest.raises(openai.BadRequestError, match="messages"):
        prompt_tokens(chat_template_kwargs={"messages": []})


def test_too_long_prompt_is_context_length_exceeded(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="tiny", prompt=[65] * 70000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 70000}])
    assert e.value.code == "context_length_exceeded"


def test_chat_logprobs_of_a_partial_utf8_token_carry_its_bytes(oa):
    c = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                   temperature=0, logprobs=True, top_logprobs=2, logit_bias={str(E2): 100})
    first = c.choices[0].logprobs.content[0]
    assert first.bytes == [E2] and first.token == "bytes:\\xe2"
    assert len(first.top_logprobs) == 2  # the raw distribution's top two (ids 258.. have no bytes at all)


@pytest.mark.parametrize("name", [k for k in BODIES if not k.startswith("_")])
def test_recorded_client_bodies_run_unchanged(fapool_server, name):
    case = BODIES[name]
    body = {**case["body"], "model": "tiny"}
    r = post(fapool_server, case["path"], body)
    assert r.status_code == 200, r.text
    if not case["stream"]:
        out = r.json()
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        assert len(out["choices"]) == len(prompts)
        if body.get("echo"):  # lm-eval: sum(token_logprobs[ctxlen:-1]) of each prompt, the generated token last
            for ch, ids in zip(out["choices"], prompts):
                lps = ch["logprobs"]["token_logprobs"]
                assert len(lps) == len(ids) + 1 and lps[0] is None and all(x <= 0 for x in lps[1:])
                assert all(max(top.values()) >= lp for lp, top in zip(lps[1:], ch["logprobs"]["top_logprobs"][1:]))
        return
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]") and not any("error" in e for e in events)
    usage = events[-1]["usage"]  # the include_usage chunk, which vllm bench reads output_tokens from
    assert events[-1]["choices"] == [] and usage["prompt_tokens"] > 0
    if body.get("ignore_eos"):
        assert usage["completion_tokens"] == body.get("max_tokens", body.get("max_completion_tokens"))
