"""Chaos against a real `fapool serve` (CPU, real Ray): actors killed while streams run. Each test
asserts what users see: identical greedy tokens where a request survives, an OpenAI-shaped error
event where it cannot, recovery in time, and no stream that hangs or is cut without a word."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.chaos_helpers import Driver, Stream, ids_of, reference, timed_get, wait_tokens
from tests.serve.conftest import Server, assert_no_ray_left

POOLED = 24  # prompt tokens: over the curve's threshold (16), so these use the pool


@pytest.fixture(scope="module")
def server():
    s = Server("--pool-curve", "16:1", "--pool-cooldown-s", "30", "--max-cpu-members", "1")
    yield s
    assert s.stop() == 0
    assert_no_ray_left(s, "Ctrl-C")


@pytest.fixture(scope="module")
def driver(server):
    d = Driver(server)
    yield d
    d.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def wait_pool(client, size, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while (pool := client.get("/pool").json())["size"] != size:
        assert time.monotonic() < deadline, f"the pool did not reach {size}: {pool}"
        time.sleep(0.2)
    return pool


def test_killing_a_pool_member_under_streams_keeps_every_token(server, driver, client):
    specs = [(ids_of(POOLED, 1), 150), (ids_of(POOLED + 4, 2), 150), (ids_of(5, 3), 150), (ids_of(7, 4), 150)]
    streams = [Stream(server.url, ids, n) for ids, n in specs]
    wait_tokens(streams, 5)
    [member] = wait_pool(client, 1)["members"]
    driver.ray.kill(driver.member(member))
    for s in streams:
        s.join()
    for s, (ids, n) in zip(streams, specs):
        assert s.finished() and s.tokens == reference(ids, n), s.events[-3:]
    pool = wait_pool(client, 1)  # healed: a new member replaced the dead one
    assert member not in pool["members"] and any("died" in e["reason"] for e in pool["events"])


def test_killing_the_controller_under_streams_keeps_bases_and_tokens(server, driver, client):
    base = driver.base(0)
    before = driver.ray.get(base.ping.remote())
    specs = [(ids_of(POOLED, 5), 200), (ids_of(6, 6), 200), (ids_of(9, 7), 200)]
    streams = [Stream(server.url, ids, n) for ids, n in specs]
    wait_tokens(streams, 5)
    driver.ray.kill(driver.controller())  # for good: the ingress's supervisor creates a new one
    slowest = 0.0
    while any(s.thread.is_alive() for s in streams):
        for path in ("/pool", "/metrics", "/ready"):
            code, took = timed_get(client, path)
            assert code == 200, path
            slowest = max(slowest, took)
        time.sleep(0.2)
    assert slowest < 2.0, f"an ops route took {slowest:.2f}s while the controller was down"
    for s, (ids, n) in zip(streams, specs):
        assert s.join().finished() and s.tokens == reference(ids, n)
    assert driver.ray.get(base.ping.remote()) == before  # the base never died
    ids = ids_of(POOLED + 2, 8)  # the new controller grows a pool again
    r = client.post("/generate", json={"prompt_token_ids": ids, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.json()["token_ids"] == reference(ids, 12)
    wait_pool(client, 1)


def test_killing_the_base_ends_streams_with_an_error_and_recovers_in_30s(server, driver, client):
    streams = [Stream(server.url, ids_of(4 + i, 10 + i), 3000, ignore_eos=True) for i in range(8)]
    wait_tokens(streams, 3)
    driver.ray.kill(driver.base(0))  # for good: the supervisor creates the base again
    killed = time.monotonic()
    while (h := client.get("/health")).status_code == 200:  # unhealthy while no base can serve
        assert time.monotonic() - killed < 10, "/health stayed 200 with the only base dead"
        time.sleep(0.05)
    assert h.status_code == 503 and h.json()["error"]["code"] == "unhealthy"
    for s in streams:
        s.join(timeout_s=30)
        err = s.errored()
        assert err is not None and err["code"] == "base_unavailable" and err["type"] == "server_error", s.events[-2:]
    assert time.monotonic() - killed < 15, "streams on a dead base must end at once"
    # New requests succeed again within 30 s, with the tokens they would have had anyway.
    ids = ids_of(8, 20)
    while True:
        r = client.post("/generate", json={"prompt_token_ids": ids, "max_tokens": 10, "temperature": 0})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "base_unavailable", r.text
        assert time.monotonic() - killed < 30, "no recovery within 30 s"
        time.sleep(0.5)
    recovered_s = time.monotonic() - killed
    assert r.json()["token_ids"] == reference(ids, 10)
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    print(f"recovered in {recovered_s:.1f}s")
