"""HTTP tests against a real `fapool serve` process: generate, OpenAI routes, errors, metrics."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fapool import EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def client(fapool_server):
    with httpx.Client(base_url=fapool_server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local_engine():
    return LLMEngine(EngineConfig(model="tiny", device="cpu"))


def local_greedy(engine, ids, n):
    [c] = engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0))
    return list(c.token_ids)


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_ready_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["pool"] in ("starting", "ready", "growing", "short_of_gpus", "recovering")
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"


def test_generate_json_matches_the_engine(client, local_engine):
    ids = [5, 17, 99, 3, 42]
    r = client.post("/generate", json={"prompt_token_ids": ids, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["token_ids"] == local_greedy(local_engine, ids, 12)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": len(body["token_ids"])}
    assert body["finish_reason"] in ("length", "stop")
    r = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 6  # 5 bytes + BOS


def test_generate_sse_one_event_per_token(client, local_engine):
    ids = [9, 8, 7, 6]
    with client.stream("POST", "/generate", json={"prompt_token_ids": ids, "max_tokens": 10,
                                                  "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    tokens = [e["token_ids"] for e in events[:-1]]
    assert all(len(t) == 1 for t in tokens)
    assert sum(tokens, []) == local_greedy(local_engine, ids, 10)[: len(tokens)]
    assert events[-2]["finish_reason"] is not None and "usage" in events[-2]


def test_openai_client_completions_and_chat(fapool_server, local_engine):
    from openai import OpenAI

    oa = OpenAI(base_url=fapool_server + "/v1", api_key="unused")
    c = oa.completions.create(model="tiny", prompt="The pool", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens >= 1
    chunks = list(oa.completions.create(model="tiny", prompt="The pool", max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
    chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    stream = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=6, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == chat.choices[0].message.content
    # The chat template of the tiny model is the plain default.
    want = local_engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.usage.prompt_tokens == len(local_engine.tokenizer.encode(want, add_special_tokens=False))


def test_openai_stream_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] is not None


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


def test_client_errors_are_4xx_with_openai_bodies(client):
    post = client.post
    assert_error(post("/generate", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(post("/generate", json={"prompt": "x", "temperature": -1}), 400, "temperature")
    assert_error(post("/generate", json={"prompt": "x", "top_p": 0}), 400, "top_p")
    assert_error(post("/generate", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    assert_error(post("/generate", json={"prompt": "x", "bogus": 1}), 400, "bogus")
    assert_error(post("/generate", json={"max_tokens": 3}), 400, "prompt")
    assert_error(post("/generate", json={"prompt_token_ids": [1, 10**9]}), 400, "token ids")
    assert_error(post("/generate", json={"prompt": "x", "max_tokens": 10**6}), 400, "context")
    assert_error(post("/v1/completions", json={"prompt": "x", "suffix": "!"}), 400, "suffix")
    assert_error(post("/v1/completions", json={"prompt": "x", "n": 0}), 400, "n")
    assert_error(post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "gpt-9")
    assert_error(post("/v1/chat/completions", json={"messages": []}), 400)
    assert_error(client.get("/no-such-route"), 404)
    # Still serving after all of that.
    assert post("/generate", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def scrape(client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_pool_size(client, size, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while (m := scrape(client))["fapool_pool_size"] != size:
        assert time.monotonic() < deadline, f"the pool did not reach {size} members"
        time.sleep(0.3)
    return m


def test_pool_grows_and_shrinks_in_metrics_and_pool_route(client, local_engine):
    before = wait_pool_size(client, 0)  # earlier tests' chat prompts may have used the pool
    ids = [7] * 70
    r = client.post("/generate", json={"prompt_token_ids": ids, "max_tokens": 6, "temperature": 0})
    assert r.json()["token_ids"] == local_greedy(local_engine, ids, 6)
    grown = scrape(client)
    assert grown["fapool_pool_size"] == 3 and grown["fapool_pool_target"] == 3
    assert grown['fapool_pool_scale_events_total{direction="up"}'] >= before['fapool_pool_scale_events_total{direction="up"}'] + 1
    after = wait_pool_size(client, 0)  # shrinks after the 2 s cooldown
    assert after['fapool_pool_scale_events_total{direction="down"}'] >= 1
    assert after["fapool_time_to_first_token_seconds_count"] > before.get("fapool_time_to_first_token_seconds_count", 0)
    assert after["fapool_time_per_output_token_seconds_count"] >= 1
    assert after["fapool_generation_tokens_total"] >= before["fapool_generation_tokens_total"] + 6
    assert after["fapool_request_context_tokens_count"] >= 1
    pool = client.get("/pool").json()
    dirs = [e["direction"] for e in pool["events"]]
    assert "up" in dirs and dirs[-1] == "down"
    from serve.metrics import METRIC_NAMES

    names = {k.split("{")[0] for k in after}
    for m in METRIC_NAMES:
        assert m in names or f"{m}_count" in names, m


def test_client_disconnect_cancels_generation(client, fapool_server):
    body = {"prompt_token_ids": [3, 4, 5], "max_tokens": 20000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=fapool_server, timeout=60) as c2:
        with c2.stream("POST", "/generate", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break
        # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    while scrape(client)["fapool_requests_running"] != 0:
        assert time.monotonic() - t0 < 3.0, "generation continued after the client left"
        time.sleep(0.1)
    stats = client.get("/pool").json()
    assert stats["requests_running"] == 0 and stats["requests_waiting"] == 0


def test_concurrent_requests_all_complete(client, local_engine):
    prompts = [[i + 1, i + 2, i + 3] for i in range(8)]
    results = [None] * len(prompts)

    def run(i):
        results[i] = client.post("/generate", json={"prompt_token_ids": prompts[i], "max_tokens": 8,
                                                    "temperature": 0}).json()["token_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [local_greedy(local_engine, p, 8) for p in prompts]
