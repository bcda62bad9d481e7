"""The operator's metrics beside the contract's move as requests run: KV pages, finish reasons,
queue time, prefill and decode rows, preemptions, prompt and generation lengths."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import Server

KV_TOKENS = 256  # 16 pages of 16 rows: four long requests cannot all fit, so some are preempted
EOS = 257


@pytest.fixture(scope="module")
def url():
    s = Server("--max-pool", "0", "--kv-capacity-tokens", str(KV_TOKENS))
    yield s.url
    assert s.stop() == 0


def scrape(url: str, wait_s: float = 0.6) -> dict[str, float]:
    time.sleep(wait_s)  # the bases' stats are cached for 0.5 s
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def gen(url: str, **body) -> dict:
    return httpx.post(url + "/generate", json={"temperature": 0, **body}, timeout=120).json()


def test_new_metrics_move_as_requests_run(url):
    before = scrape(url)
    assert before['fapool_kv_cache_total_pages{base="0"}'] == KV_TOKENS // 16
    assert before['fapool_kv_cache_used_pages{base="0"}'] == 0
    for reason in ("stop", "length", "abort", "error"):
        assert f'fapool_requests_finished_total{{reason="{reason}"}}' in before
    gen(url, prompt_token_ids=[1, 2, 3, 4], max_tokens=5, ignore_eos=True)  # length
    gen(url, prompt_token_ids=[1, 2, 3], max_tokens=5, logit_bias={str(EOS): 100})  # stop at once
    with httpx.Client(timeout=60) as c:  # abort: the client leaves mid-stream
        body = {"prompt_token_ids": [5] * 40, "max_tokens": 210, "ignore_eos": True, "stream": True}
        with c.stream("POST", url + "/generate", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
    after = scrape(url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['fapool_requests_finished_total{reason="length"}'] == 1
    assert delta['fapool_requests_finished_total{reason="stop"}'] == 1
    assert delta['fapool_requests_finished_total{reason="abort"}'] == 1
    assert delta["fapool_request_prompt_tokens_count"] == 2 and delta["fapool_request_prompt_tokens_sum"] == 7
    assert delta["fapool_request_generation_tokens_sum"] == 6  # 5 + 1 (the EOS)
    assert delta["fapool_request_queue_time_seconds_count"] == 2
    assert delta['fapool_prefill_tokens_total{base="0"}'] >= 4 + 3 + 40
    assert delta['fapool_decode_tokens_total{base="0"}'] >= 4  # the first request's tokens after its first
    # The aborted request's pages are freed once the server has seen the client leave (the proxy,
    # the replica and the base each take a moment on a busy machine: CI once saw them still held
    # 0.6 s after). That leaving cancels the generation itself is test_http's
    # test_client_disconnect_cancels_generation (20,000 tokens asked, stopped within 3 s).
    deadline = time.monotonic() + 15
    while after['fapool_kv_cache_used_pages{base="0"}'] != 0 and time.monotonic() < deadline:
        after = scrape(url)
    assert after['fapool_kv_cache_used_pages{base="0"}'] == 0


def test_preemptions_are_counted(url):
    before = scrape(url)
    results = []

    def run(i: int) -> None:  # 6 x (60 + 190) rows against 256: the youngest are preempted
        results.append(gen(url, prompt_token_ids=[i + 1] * 60, max_tokens=190, ignore_eos=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    used = []
    while any(t.is_alive() for t in threads):  # KV held while they run, at the stats' next refresh
        mid = scrape(url, 0.1)
        used.append((mid['fapool_kv_cache_used_pages{base="0"}'], mid['fapool_kv_cache_usage_ratio{base="0"}']))
    [t.join() for t in threads]
    assert max(u for u, _ in used) >= 4 and 0 < max(r for _, r in used) <= 1  # 60+ rows: four pages
    assert [r["finish_reason"] for r in results] == ["length"] * 6
    after = scrape(url)
    assert after['fapool_preemptions_total{base="0"}'] > before['fapool_preemptions_total{base="0"}']
    assert after['fapool_requests_finished_total{reason="length"}'] - \
        before['fapool_requests_finished_total{reason="length"}'] == 6
