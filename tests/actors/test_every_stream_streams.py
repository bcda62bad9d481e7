"""Every stream streams: on every route, for text and token-id prompts, each event leaves when its
tokens exist. Measured in engine steps, not seconds: when an event arrives, how many steps had the
base finished beyond the one that made the event's last token? A stream that streams is a step or
two behind (the gathering interval, alone, is 1 ms); one that holds its tokens back is dozens.

The real routes on a real socket (uvicorn in a thread of this process, the service on the actor
tests' Ray cluster), so the test can read the base's step log: when each step ended.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import statistics
import threading
import time

import httpx
import pytest
import ray

from actors.config import ClusterConfig
from fapool.config import EngineConfig

TOKENS = 48
SLACK_STEPS = 4  # median lag an event may have, in steps (a 2-core machine shared with others)


@pytest.fixture(scope="module")
def served(ray_session):
    import uvicorn

    from serve.app import create_app
    from serve.service import InferenceService, set_current

    cfg = ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=8192))
    svc = InferenceService(cfg.replace(policy=dataclasses.replace(cfg.policy, max_pool=0)))
    set_current(svc, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url, svc.bases[0]
    server.should_exit = True
    thread.join(timeout=30)
    svc.cluster.shutdown()


def _stream(url: str, path: str, body: dict) -> list[tuple[float, int]]:
    """(arrival wall time, tokens so far) of each event that carries tokens."""
    arrivals, tokens = [], 0
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.time()
            ev = json.loads(line[6:])
            if path == "/generate":
                n = len(ev["token_ids"])
            else:  # one OpenAI chunk per token event (not chat's first, the role's; nor the usage chunk)
                c = ev["choices"][0] if ev["choices"] else {}
                n = int("text" in c or ("content" in c.get("delta", {}) and "role" not in c["delta"]))
            if n:
                tokens += n
                arrivals.append((now, tokens))
    return arrivals


CASES = [
    ("/generate", "ids", {"prompt_token_ids": [65 + i % 26 for i in range(600)]}),
    ("/generate", "text", {"prompt": "abcdefghijklmnopqrstuvwxyz" * 20}),
    ("/v1/completions", "ids", {"prompt": [65 + i % 26 for i in range(600)]}),
    ("/v1/completions", "text", {"prompt": "abcdefghijklmnopqrstuvwxyz" * 20}),
    ("/v1/chat/completions", "text", {"messages": [{"role": "user", "content": "abcdefghijklmnopqrstuvwxyz" * 20}]}),
]


@pytest.mark.parametrize("path,kind,prompt", CASES, ids=[f"{p}-{k}" for p, k, _ in CASES])
def test_each_event_leaves_when_its_tokens_exist(served, path, kind, prompt):
    url, base = served
    ray.get(base.step_log.remote(clear=True))
    arrivals = _stream(url, path, {**prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
                                   "stream": True})
    steps = ray.get(base.step_log.remote(clear=True))
    ends = sorted(s.time_s + s.wall_s for s in steps)
    # The request ran alone: its k-th token came out of its k-th step (the prefill makes the first).
    lags = [sum(e <= t for e in ends) - k for t, k in arrivals]
    assert arrivals and statistics.median(lags) <= SLACK_STEPS, (
        f"{path} ({kind}) held its tokens back: events arrived {lags} steps after their tokens existed")
    assert arrivals[-1][1] == TOKENS, f"{path} ({kind}): {arrivals[-1][1]} token events of {TOKENS} tokens"
