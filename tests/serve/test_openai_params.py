"""What vLLM and OpenAI users expect of the OpenAI routes: every field applied or refused by name,
max_tokens null meaning the context, include_usage's shape, one chunk per token, batched prompts,
and `/tokenize`, `/detokenize`, `/version`, `/v1/models/{id}`."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import Server

KV_TOKENS = 1024  # the context limit of this server: the KV cache is smaller than the model's

# Every top-level field of OpenAI's completions and chat request schemas, with a value that would
# change the output. Applied: the answer is 200. Refused: a 400 whose message names the field.
TEXT = {"prompt": "Hi", "max_tokens": 2}
COMPLETION_FIELDS = {
    "model": ("tiny", "applied"), "prompt": ("Hello", "applied"), "max_tokens": (3, "applied"),
    "seed": (5, "applied"), "stop": (["zz"], "applied"), "stream": (True, "applied"),
    "stream_options": ({"include_usage": True}, "applied"), "temperature": (0.5, "applied"),
    "top_p": (0.5, "applied"), "user": ("u-1", "applied"),
    "best_of": (2, "applied"), "echo": (True, "applied"), "frequency_penalty": (0.5, "applied"),
    "logit_bias": ({"5": 10}, "applied"), "logprobs": (2, "applied"), "n": (2, "applied"),
    "presence_penalty": (0.5, "applied"), "suffix": ("!", "refused"),
}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
CHAT_FIELDS = {
    "messages": ([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "applied"),
    "model": ("tiny", "applied"), "max_completion_tokens": (3, "applied"), "max_tokens": (3, "applied"),
    "seed": (5, "applied"), "stop": ("zz", "applied"), "stream": (True, "applied"),
    "stream_options": ({"include_usage": True}, "applied"), "temperature": (0.5, "applied"),
    "top_p": (0.5, "applied"), "user": ("u-1", "applied"),
    # Records for the caller (or, for parallel_tool_calls, meaningless without tools): no output changes.
    "metadata": ({"k": "v"}, "applied"), "service_tier": ("auto", "applied"),
    "prompt_cache_key": ("k", "applied"), "safety_identifier": ("s", "applied"),
    "parallel_tool_calls": (False, "applied"),
    "audio": ({"voice": "alloy", "format": "wav"}, "refused"), "frequency_penalty": (0.5, "applied"),
    "function_call": ("auto", "refused"), "functions": ([{"name": "f"}], "refused"),
    "logit_bias": ({"5": 10}, "applied"), "logprobs": (True, "applied"),
    "modalities": (["text", "audio"], "refused"), "n": (2, "applied"),
    "prediction": ({"type": "content", "content": "x"}, "refused"), "presence_penalty": (0.5, "applied"),
    "reasoning_effort": ("low", "refused"), "response_format": ({"type": "json_object"}, "refused"),
    "store": (True, "refused"), "tool_choice": ("auto", "refused"),
    "tools": ([{"type": "function", "function": {"name": "f"}}], "refused"), "top_logprobs": (2, "applied"),
    "verbosity": ("low", "refused"), "web_search_options": ({}, "refused"),
}


@pytest.fixture(scope="module")
def url():
    s = Server("--max-pool", "0", "--kv-capacity-tokens", str(KV_TOKENS))
    yield s.url
    assert s.stop() == 0


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def events(r: httpx.Response) -> list:
    out = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


@pytest.mark.parametrize("path,base,fields", [("/v1/completions", TEXT, COMPLETION_FIELDS),
                                              ("/v1/chat/completions", CHAT, CHAT_FIELDS)])
def test_every_openai_field_is_applied_or_refused_by_name(url, path, base, fields):
    for field, (value, fate) in fields.items():
        body = {**base, field: value}
        if field == "stream_options":
            body["stream"] = True
        if field == "top_logprobs":  # applied with logprobs: true (alone, a 400 below)
            body["logprobs"] = True
        r = post(url, path, body)
        if fate == "applied":
            assert r.status_code == 200, (field, r.text[:300])
        else:
            assert r.status_code == 400, (field, r.text[:300])
            assert field in r.json()["error"]["message"] and r.json()["error"]["param"] == field
    if "top_logprobs" in fields:
        alone = post(url, path, {**base, "top_logprobs": 2})
        assert alone.status_code == 400 and alone.json()["error"]["param"] == "top_logprobs"
    # vLLM's extensions, applied too.
    for field, value in {"min_tokens": 1, "repetition_penalty": 1.2, "stop_token_ids": [5], "ignore_eos": True,
                         "top_k": 5}.items():
        r = post(url, path, {**base, field: value})
        assert r.status_code == 200, (field, r.text[:300])
    unknown = post(url, path, {**base, "frobnicate": 1})
    assert unknown.status_code == 400 and "frobnicate" in unknown.json()["error"]["message"]


def test_max_tokens_null_runs_to_the_context_limit(url):
    ids = [(i % 200) + 1 for i in range(KV_TOKENS - 3)]
    r = post(url, "/v1/completions", {"prompt": ids, "max_tokens": None, "temperature": 0, "ignore_eos": True}).json()
    assert r["usage"] == {"prompt_tokens": KV_TOKENS - 3, "completion_tokens": 3, "total_tokens": KV_TOKENS,
                          "prompt_tokens_details": {"cached_tokens": 0}}  # a fresh prompt: nothing cached
    assert r["choices"][0]["finish_reason"] == "length"
    long_chat = {"messages": [{"role": "user", "content": "x" * (KV_TOKENS - 40)}], "temperature": 0,
                 "ignore_eos": True}
    c = post(url, "/v1/chat/completions", long_chat).json()
    assert c["usage"]["total_tokens"] == KV_TOKENS and c["choices"][0]["finish_reason"] == "length"
    full = post(url, "/v1/completions", {"prompt": [1] * KV_TOKENS})
    assert full.status_code == 400 and full.json()["error"]["code"] == "context_length_exceeded"


def test_include_usage_shape_and_one_chunk_per_token(url):
    for path, base in (("/v1/completions", TEXT), ("/v1/chat/completions", CHAT)):
        body = {**base, "max_tokens": 6, "stream": True, "ignore_eos": True}  # sampled: EOS could end it early
        plain = events(post(url, path, body))
        assert all("usage" not in e for e in plain)
        with_usage = events(post(url, path, {**body, "stream_options": {"include_usage": True}}))
        *chunks, last = with_usage
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 6
        assert all(e["usage"] is None for e in chunks)
        if path == "/v1/chat/completions":  # the role comes first, in a chunk of its own
            assert chunks.pop(0)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        # One chunk per token, each when its token exists (its text may be held back), none without.
        assert len(chunks) == 6, chunks
        assert all("text" in c["choices"][0] or "content" in c["choices"][0]["delta"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_batched_prompts_are_one_choice_each(url):
    prompts = [[1, 2, 3], [40, 50], [7]]
    single = [post(url, "/generate", {"prompt_token_ids": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
              .json()["text"] for p in prompts]
    body = {"prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    r = post(url, "/v1/completions", body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == single
    assert r["usage"]["completion_tokens"] == 15 and r["usage"]["prompt_tokens"] == 6
    texts = ["", "", ""]
    for e in events(post(url, "/v1/completions", {**body, "stream": True})):
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == single
    strings = post(url, "/v1/completions", {"prompt": ["ab", "cd"], "max_tokens": 2}).json()
    assert len(strings["choices"]) == 2


def test_tokenize_detokenize_version_and_model_card(url):
    t = post(url, "/tokenize", {"prompt": "Hello"}).json()
    assert t["tokens"][1:] == list(b"Hello") and t["count"] == 6 and t["max_model_len"] > 0  # BOS first
    bare = post(url, "/tokenize", {"prompt": "Hello", "add_special_tokens": False}).json()
    assert bare["tokens"] == list(b"Hello")
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    usage = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat["count"] == usage.json()["usage"]["prompt_tokens"]
    assert post(url, "/detokenize", {"tokens": bare["tokens"]}).json() == {"prompt": "Hello"}
    assert post(url, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert post(url, "/tokenize", {"prompt": "a", "messages": []}).status_code == 400
    assert httpx.get(url + "/version").json()["version"]
    card = httpx.get(url + "/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model"
    missing = httpx.get(url + "/v1/models/gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
