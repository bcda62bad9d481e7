"""A server with an API key and tight limits: 401, 413, 429 with Retry-After, request timeout."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import Server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def strict():
    server = Server("--max-inflight", "2", "--request-timeout-s", "4", "--max-body-bytes", "65536",
                    "--pool-curve", "4096:1", api_key=KEY)
    yield server
    assert server.stop() == 0


def err(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


def test_api_key_on_every_route_but_health(strict):
    url, auth = strict.url, strict.headers
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/ready", "/metrics", "/pool", "/dashboard", "/v1/models"):
        assert err(httpx.get(url + path), 401)["code"] == "invalid_api_key"
        assert err(httpx.get(url + path, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + path, headers=auth).status_code == 200
    body = {"prompt": "hi", "max_tokens": 2}
    assert err(httpx.post(url + "/generate", json=body), 401)
    assert err(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Basic x"}), 401)
    assert httpx.post(url + "/generate", json=body, headers=auth).status_code == 200
    # The dashboard page can carry the key in its URL (a browser cannot set headers on navigation).
    assert httpx.get(url + f"/dashboard?api_key={KEY}").status_code == 200
    assert err(httpx.get(url + "/pool?api_key=" + KEY), 401)  # only the page itself


def test_oversized_body_is_413(strict):
    big = {"prompt": "x" * 70000, "max_tokens": 2}
    e = err(httpx.post(strict.url + "/generate", json=big, headers=strict.headers), 413)
    assert "limit" in e["message"]

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(20):
            yield b"x" * 8192

    r = httpx.post(strict.url + "/generate", content=chunks(),
                   headers={**strict.headers, "content-type": "application/json"})
    err(r, 413)


def test_queue_full_is_429_with_retry_after(strict):
    body = {"prompt_token_ids": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    statuses, retry = [], []

    def run():
        r = httpx.post(strict.url + "/generate", json=body, headers=strict.headers, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry.append(r.headers.get("retry-after"))
            assert r.json()["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=run) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    assert all(r == "1" for r in retry)


def test_request_timeout_frees_the_request(strict):
    body = {"prompt_token_ids": [1, 2, 3], "max_tokens": 60000, "ignore_eos": True}
    t0 = time.monotonic()
    r = httpx.post(strict.url + "/generate", json=body, headers=strict.headers, timeout=60)
    assert err(r, 504)["code"] == "timeout"
    assert time.monotonic() - t0 < 15
    deadline = time.monotonic() + 5
    while httpx.get(strict.url + "/pool", headers=strict.headers).json()["requests_running"] != 0:
        assert time.monotonic() < deadline, "the timed-out request kept running"
        time.sleep(0.2)
    ok = httpx.post(strict.url + "/generate", json={"prompt": "still", "max_tokens": 2}, headers=strict.headers)
    assert ok.status_code == 200
