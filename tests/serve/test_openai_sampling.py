"""Logprobs, echo, n, best_of, penalties, logit_bias, stop_token_ids and min_tokens through the
official `openai` client against a real `fapool serve --device cpu`, checked against a reference
forward of the same tiny model (built here, on the CPU) and the processors' definitions."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from fapool import EngineConfig, LLMEngine
from tests.helpers.reference import penalized, reference_logits
from tests.serve.conftest import Server

EOS = 257  # the tiny tokenizer's </s>
TOL = 1e-3
PENALTY_PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 68, 69, 70, 71, 72, 73]  # float32 on both sides; the server's paged attention against plain causal attention


@pytest.fixture(scope="module")
def server():
    s = Server("--max-pool", "0", "--kv-capacity-tokens", "2048")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=1024))


def tokenize(server, **body) -> list[int]:
    return httpx.post(server.url + "/tokenize", json=body, timeout=30).json()["tokens"]


def greedy_ids(server, ids: list[int], n: int) -> list[int]:
    body = {"prompt_token_ids": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    return httpx.post(server.url + "/generate", json=body, timeout=60).json()["token_ids"]


def ref_logprobs(engine, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(reference_logits(engine.model, ids), -1)


def check_top(engine, row: torch.Tensor, top: dict[str, float], k: int, chosen: int) -> None:
    """Each entry of a completions top_logprobs map is one of the k most likely tokens (or the
    chosen one), at its reference logprob."""
    ids = row.topk(k).indices.tolist() + [chosen]
    assert len(top) >= 1
    for text, v in top.items():
        assert any(engine.tokenizer.decode([t], skip_special_tokens=False) == text
                   and abs(float(row[t]) - v) < TOL for t in ids), (text, v)


def test_completion_logprobs_equal_the_reference(server, client, engine):
    ids = tokenize(server, prompt="Hello there")
    out = greedy_ids(server, ids, 6)
    ref = ref_logprobs(engine, ids + out)
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6
    for j, t in enumerate(out):
        row = ref[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[t]), abs=TOL)
        check_top(engine, row, lp.top_logprobs[j], 3, t)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    streamed = []
    for chunk in client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                           logprobs=3, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    # /generate: the same numbers by token id, and the prompt's.
    g = httpx.post(server.url + "/generate", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True, "logprobs": 2, "prompt_logprobs": 1},
                   timeout=60).json()
    assert [x["token_id"] for x in g["logprobs"]] == out
    assert [x["logprob"] for x in g["logprobs"]] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [x["token_id"] for x in g["logprobs"][0]["top_logprobs"]] == ref[len(ids) - 1].topk(2).indices.tolist()
    assert g["prompt_logprobs"][0] is None
    assert [x["logprob"] for x in g["prompt_logprobs"][1:]] == pytest.approx(
        [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))], abs=TOL)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_top_logprobs_equal_the_reference(server, client, engine, stream):
    messages = [{"role": "user", "content": "Tell me"}]
    ids = tokenize(server, messages=messages)
    out = greedy_ids(server, ids, 5)
    ref = ref_logprobs(engine, ids + out)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2, stream=stream, extra_body={"ignore_eos": True})
    content = [c for chunk in r if chunk.choices and chunk.choices[0].logprobs
               for c in chunk.choices[0].logprobs.content] if stream else r.choices[0].logprobs.content
    assert len(content) == 5
    for j, (t, item) in enumerate(zip(out, content)):
        row = ref[len(ids) - 1 + j]
        assert item.logprob == pytest.approx(float(row[t]), abs=TOL)
        raw = bytes(item.bytes)
        assert raw == engine.tokenizer.token_bytes(t)
        try:  # the token's text, or for part of a character its bytes, as OpenAI writes them
            assert item.token == raw.decode("utf-8")
        except UnicodeDecodeError:
            assert item.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        top_v = row.topk(2).values.tolist()
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(top_v, abs=TOL)


def test_echo_gives_the_prompt_logprobs(server, client, engine):
    prompt = "The cat sat on the mat"
    ids = tokenize(server, prompt=prompt)
    out = greedy_ids(server, ids, 1)
    ref = ref_logprobs(engine, ids + out)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))] + [float(ref[len(ids) - 1, out[0]])]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=TOL)
    # lm-eval's log-likelihood of a continuation: the sum over its tokens.
    assert sum(lp.token_logprobs[1 : len(ids)]) == pytest.approx(sum(want[:-1]), abs=1e-2)
    streamed = []
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                           echo=True, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def check_offsets(text: str, lp) -> None:
    """OpenAI's text_offset: where each token starts in the returned text."""
    assert len(lp.text_offset) == len(lp.tokens)
    for i, (tok, at) in enumerate(zip(lp.tokens, lp.text_offset)):
        assert text[at:].startswith(tok), (i, tok, at, text)
    assert "".join(lp.tokens) == text  # here no character spans two tokens


def test_echo_text_offset_indexes_the_returned_text(server, client):
    """The prompt's bos (first of its tokens) is not in the echoed text: it takes no room."""
    ids = tokenize(server, prompt="The cat sat")
    assert ids[0] == 256  # the tiny tokenizer's <s>
    for prompt in ("The cat sat", ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                      echo=True, extra_body={"ignore_eos": True})
        c = r.choices[0]
        assert c.text.startswith("The cat sat") and len(c.logprobs.tokens) == len(ids) + 6
        check_offsets(c.text, c.logprobs)
        text, merged = "", {"tokens": [], "text_offset": []}
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                               echo=True, stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices:
                text += chunk.choices[0].text
                if chunk.choices[0].logprobs:
                    merged["tokens"] += chunk.choices[0].logprobs.tokens
                    merged["text_offset"] += chunk.choices[0].logprobs.text_offset
        assert text == c.text and merged["tokens"] == c.logprobs.tokens
        assert merged["text_offset"] == c.logprobs.text_offset


def test_n_choices_greedy_equal_and_seeded_reproducible(client):
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0, n=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) == 1
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 3

    def seeded():
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=1.0, seed=42, n=3,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in r.choices]

    first = seeded()
    assert seeded() == first and len(set(first)) == 3
    chat = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=1.0, seed=42, n=3, extra_body={"ignore_eos": True})
            for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in chat]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=1.0, seed=42, n=3, stream=True,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts[0]


def test_best_of_returns_the_most_likely_candidate(client):
    args = dict(model="tiny", prompt="Hi", max_tokens=5, temperature=1.0, seed=7, logprobs=0,
                extra_body={"ignore_eos": True})
    candidates = client.completions.create(n=3, **args).choices
    [picked] = client.completions.create(best_of=3, **args).choices
    scores = [sum(c.logprobs.token_logprobs) for c in candidates]
    assert picked.text == candidates[scores.index(max(scores))].text
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny", prompt="Hi", n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="n=3"):  # 300 engine requests in one call
        client.completions.create(model="tiny", prompt=["a"] * 100, n=3)


@pytest.mark.parametrize("kw,field", [({"repetition": 2.0}, {"repetition_penalty": 2.0}),
                                      ({"frequency": 2.0}, {"frequency_penalty": 2.0}),
                                      ({"presence": 2.0}, {"presence_penalty": 2.0}),
                                      ({"bias": {65: 5.0}}, {"logit_bias": {"65": 5.0}})])
def test_each_penalty_changes_tokens_as_its_definition_says(server, client, engine, kw, field):
    ids = PENALTY_PROMPT  # its greedy continuation repeats tokens within 12: every penalty has work
    out: list[int] = []
    for _ in range(12):  # the reference: greedy over the processed reference logits, token by token
        row = reference_logits(engine.model, ids + out)[-1]
        out.append(int(penalized(row, ids, out, **kw).argmax()))
    raw = ref_logprobs(engine, ids + out)
    openai_kw = {k: v for k, v in field.items() if k != "repetition_penalty"}
    extra = {"ignore_eos": True, **({"repetition_penalty": 2.0} if "repetition_penalty" in field else {})}
    # Token texts of this byte-level model are often "\ufffd": the tokens are told apart by their
    # logprobs (of the raw distribution), which name them.
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body=extra, **openai_kw)
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    got = r.choices[0].logprobs.token_logprobs
    assert got == pytest.approx([float(raw[len(ids) - 1 + j, t]) for j, t in enumerate(out)], abs=TOL)
    assert r.choices[0].text == engine.tokenizer.decode(out)
    assert out != greedy_ids(server, ids, 12)
    assert got != pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=TOL)


def test_min_tokens_and_stop_token_ids_hold(client):
    eos_now = dict(model="tiny", prompt="Hi", max_tokens=10, temperature=0, logit_bias={str(EOS): 100})
    r = client.completions.create(**eos_now)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(**eos_now, extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, temperature=0, logit_bias={"65": 100},
                                  extra_body={"stop_token_ids": [65], "min_tokens": 2, "ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={"min_tokens": 5})
