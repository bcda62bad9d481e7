"""What a user types on day one, typed the same way: `fapool --version`, the help that lists the
presets, `python -m bench.serve` against the running server (its vocabulary from the server; a
run whose requests fail exits 1 and says why), `python -m bench.run` with a context over the
prefill chunk, and `/metrics` forgetting pool members that left."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import FAPOOL, REPO

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_version_and_the_presets_in_help():
    v = run(str(FAPOOL), "--version")
    assert v.returncode == 0 and v.stdout.startswith("fapool ")
    for cmd in ([str(FAPOOL), "serve", "--help"], [sys.executable, "-m", "bench.run", "--help"]):
        out = run(*cmd)
        assert out.returncode == 0 and all(p in out.stdout for p in ("tiny", "paper", "llama8b")), out.stdout


def test_bench_serve_takes_the_servers_vocab_and_fails_loudly(fapool_server, tmp_path):
    ok = run(sys.executable, "-m", "bench.serve", "--url", fapool_server, "--concurrency", "4", "--requests", "6",
             "--prompt-tokens", "40", "--max-tokens", "6", "--out", str(tmp_path), "--name", "ok")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    load = json.loads((tmp_path / "ok.json").read_text())["load"]
    assert load["ok"] == 6 and load["errors"] == [] and load["output_tokens_per_s"] > 0
    # Every request over the context: exit 1, the reason on stderr, and JSON without NaN.
    bad = run(sys.executable, "-m", "bench.serve", "--url", fapool_server, "--concurrency", "2", "--requests", "2",
              "--prompt-tokens", "70000", "--max-tokens", "4", "--out", str(tmp_path), "--name", "bad")
    assert bad.returncode == 1 and "2 of 2 requests failed" in bad.stderr and "400" in bad.stderr, bad.stderr[-3000:]
    result = json.loads((tmp_path / "bad.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert result["failed"] and result["load"]["ok"] == 0
    assert all(v is None or not math.isnan(v) for v in result["load"]["ttft_ms"].values())


def test_metrics_drop_the_members_that_left(fapool_server):
    """A 40-token prompt grows the pool (curve 32:2); after the 2 s cooldown it drains to 0 and
    `/metrics` has no per-member series left."""
    r = httpx.post(f"{fapool_server}/generate", json={"prompt_token_ids": [7] * 40, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
    deadline = time.monotonic() + 120
    while httpx.get(f"{fapool_server}/pool", timeout=10).json()["members"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert httpx.get(f"{fapool_server}/pool", timeout=10).json()["members"] == []
    time.sleep(1.0)  # the next snapshot
    text = httpx.get(f"{fapool_server}/metrics", timeout=10).text
    assert [line for line in text.splitlines() if line.startswith("fapool_pool_member_kv_")] == []


@pytest.mark.slow
def test_bench_run_prefills_contexts_over_the_chunk(tmp_path):
    """`python -m bench.run --preset tiny --device cpu`, cut to one context of 2,100 tokens: its
    prompt is prefilled in 2,048-token chunks (two on a base alone), and TTFT is their sum."""
    res = run(sys.executable, "-m", "bench.run", "--preset", "tiny", "--device", "cpu", "--pools", "0,1",
              "--contexts", "2100", "--batches", "1", "--steps", "3", "--oversized", "0", "--no-hf", "--no-scaleup",
              "--out", str(tmp_path), "--name", "chunked", timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    result = json.loads((tmp_path / "chunked.json").read_text())
    # On its base alone the prompt takes two chunks (the scenario checks they hold all 2,100 tokens).
    assert [r["pool"] for r in result["prefill"]] == [0, 1] and result["prefill"][0]["chunks"] == 2
    assert all(r["ttft_s"] > 0 for r in result["prefill"]) and result["prefill"][1]["pooled"] == 1


def test_start_up_says_where_it_serves_and_nothing_misleading(fapool_server):
    log = open(f"/tmp/fapool-serve-{fapool_server.rsplit(':', 1)[1]}.log").read()
    assert f"FA Pool serving 'tiny' on {fapool_server}" in log
    assert "New http_options" not in log and "is ready at http" not in log
