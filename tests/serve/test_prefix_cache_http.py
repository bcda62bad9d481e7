"""Prefix caching at the edges: usage.prompt_tokens_details.cached_tokens on the OpenAI routes
(plain and streamed), the hit counters in /metrics, and what /pool and the dashboard (a real
headless Chromium, as tests/serve/test_dashboard.py) say the cache holds."""
from __future__ import annotations

import json
import random
import time

import httpx

from tests.serve.test_dashboard import CHROMIUM, CHROMIUM_ARGS


def post(url: str, path: str, body: dict) -> httpx.Response:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def counters(url: str) -> dict[str, float]:
    time.sleep(0.6)  # the bases' stats are cached for 0.5 s
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("fapool_prefix_cache_"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def test_a_repeated_prompt_reports_its_cached_tokens(fapool_server):
    url = fapool_server
    ids = random.Random(23).choices(range(3, 250), k=100)  # 6 full pages of 16 (page 16 on CPU)
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    before = counters(url)
    first = post(url, "/v1/completions", body).json()
    second = post(url, "/v1/completions", body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    # The last page holds the last prompt token, which is always computed: 6 pages of 16.
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    streamed = post(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
    after = counters(url)
    assert after["fapool_prefix_cache_queries_total"] - before["fapool_prefix_cache_queries_total"] >= 300
    assert after["fapool_prefix_cache_hits_total"] - before["fapool_prefix_cache_hits_total"] >= 2 * 96
    assert after["fapool_prefix_cache_tokens"] >= 96
    pool = httpx.get(url + "/pool", timeout=30).json()["prefix_cache"]
    assert pool["enabled"] is True and "full KV pages" in pool["holds"]
    assert pool["cached_tokens"] >= 96 and 0 < pool["hit_rate"] <= 1


def test_chat_reports_cached_tokens_streamed_and_not(fapool_server):
    url = fapool_server
    words = " ".join(random.Random(29).choice(["alpha", "beta", "gamma", "delta"]) for _ in range(60))
    body = {"messages": [{"role": "system", "content": words}, {"role": "user", "content": "a question"}],
            "max_tokens": 3, "temperature": 0}
    first = post(url, "/v1/chat/completions", body).json()
    again = post(url, "/v1/chat/completions", body).json()
    streamed = post(url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    last = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")][-1]
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Whole pages of 16, the page of the last prompt token computed again.
    for usage in (again["usage"], last["usage"]):
        assert usage["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    assert again["choices"][0]["message"] == first["choices"][0]["message"]


def test_the_dashboard_says_what_the_cache_holds(fapool_server):
    from playwright.sync_api import sync_playwright

    ids = random.Random(31).choices(range(3, 250), k=70)
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    post(fapool_server, "/v1/completions", body)
    post(fapool_server, "/v1/completions", body)  # a hit: 64 tokens found
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{fapool_server}/dashboard?interval_ms=500")
            page.wait_for_function("document.querySelector('#prefix-summary').textContent.includes('found')",
                                   timeout=60_000)
            summary = page.text_content("#prefix-summary")
            assert "tokens cached" in summary and not summary.startswith("0 tokens")
            assert "full KV pages" in page.text_content("#prefix-holds")
        finally:
            browser.close()
