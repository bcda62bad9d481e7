"""End to end: `ray job submit -- python -m serve.batch` (Ray Data) on a real Ray head started by
`ray start` (`tests/helpers/ray_head.py`). The input format and argument checks, without Ray, are
`tests/unit/test_batch_lines.py`.
"""
import json
import random
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.ray_head import alive_fapool_actors, ray_head, ray_job  # noqa: F401 (ray_head: a fixture)

LONG_TEXT = "FA Pool spreads the attention of long contexts over a pool of actors. " * 2  # > 40 tokens


def read_output(out_dir):
    """The records of a job's output directory: its `*.json` files in file-name order."""
    files = sorted(Path(out_dir).glob("*.json"))
    assert files, f"no output files in {out_dir}"
    return [json.loads(x) for f in files for x in f.read_text().splitlines()]


def submit(head, lines, *flags, rc=0):
    """Run one batch job through `ray job submit`; returns (summary, output records, seconds)."""
    in_path = Path(tempfile.mkstemp(suffix=".jsonl", dir=head["temp_dir"])[1])
    out_dir = in_path.with_suffix(".out")
    in_path.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    res = ray_job(head, "serve.batch", "--input", str(in_path), "--output", str(out_dir), *flags)
    log = res.stdout + res.stderr
    assert res.returncode == rc, log[-6000:]
    summaries = set(re.findall(r"SUMMARY (\{.*\})", log))  # a failed job's log is shown twice
    assert len(summaries) == 1, log[-6000:]
    summary = json.loads(summaries.pop())
    assert summary["output"] == str(out_dir) and f"written as JSON lines under {out_dir}" in log
    assert re.search(r"%d/%d \[" % ((n := sum(1 for x in lines if x.strip())), n), log), log[-3000:]  # progress
    return summary, read_output(out_dir), time.monotonic() - t0


# ---- end to end through `ray job submit` -------------------------------------------------------
def reference(requests):
    """What the local engine gives for (line, SamplingParams) pairs."""
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    prompts = [line.get("prompt", line.get("prompt_token_ids")) for line, _ in requests]
    return engine.generate(prompts, [p for _, p in requests])


def assert_matches(records, requests, want):
    for o, (line, params), w in zip(records, requests, want):
        assert o["error"] is None, o
        assert o["token_ids"] == list(w.token_ids), o["id"]
        assert (o["text"], o["finish_reason"]) == (w.text, w.finish_reason), o["id"]
        assert o["usage"] == {"prompt_tokens": w.prompt_tokens, "completion_tokens": w.completion_tokens}
        if params.ignore_eos and not params.stop:
            assert len(o["token_ids"]) == params.max_tokens


@pytest.mark.slow
def test_batch_job_matches_local_engine(ray_head):
    long_ids = torch.randint(3, 300, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    # A stop string the greedy output of "abc" holds: its first pair of printable characters.
    probe = reference([({"prompt": "abc"}, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))])[0].text
    stop = next((probe[i:i + 2] for i in range(len(probe) - 1)
                 if probe[i:i + 2].isprintable() and "\ufffd" not in probe[i:i + 2]), None)
    assert stop, repr(probe)
    good = [  # (line, the SamplingParams it stands for)
        ({"id": "short", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
         SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)),
        ({"id": "long-text", "prompt": LONG_TEXT, "max_tokens": 12, "ignore_eos": True},
         SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
        ({"id": "long-ids", "prompt_token_ids": long_ids, "max_tokens": 20, "ignore_eos": True},
         SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
        ({"prompt": "no id, defaults"}, SamplingParams(max_tokens=64, temperature=0)),
        ({"id": "seeded", "prompt": "seeded", "temperature": 0.8, "top_k": 50, "seed": 11, "max_tokens": 10,
          "ignore_eos": True}, SamplingParams(max_tokens=10, temperature=0.8, top_k=50, seed=11, ignore_eos=True)),
        ({"id": "stop", "prompt": "abc", "max_tokens": 16, "stop": [stop], "ignore_eos": True},
         SamplingParams(max_tokens=16, temperature=0, stop=(stop,), ignore_eos=True)),
    ]
    bad = [
        "{not json",
        json.dumps({"id": "no-prompt", "max_tokens": 4}),
        json.dumps({"id": "neg-temp", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "top-p", "prompt": "x", "top_p": 0}),
        json.dumps({"id": "vocab", "prompt_token_ids": [1, 2, 999]}),  # refused by the engine, not the parser
        json.dumps({"id": "typo", "prompt": "x", "max_token": 4}),
    ]
    lines = [json.dumps(g[0]) for g in good[:3]] + bad[:3] + [json.dumps(g[0]) for g in good[3:]] + bad[3:]
    summary, out, job_s = submit(ray_head, lines, "--max-pool", "2", "--pool-curve", "16:1,32:2",
                                 "--device", "cpu", "--concurrency", "4")

    want = reference(good)
    assert want[-1].finish_reason == "stop" and len(want[-1].token_ids) < 16  # the stop string fired
    assert [o["line"] for o in out] == list(range(1, len(lines) + 1))  # one record a line, in input order
    got_good, got_bad = out[:3] + out[6:9], out[3:6] + out[9:]
    assert [o["id"] for o in got_good] == ["short", "long-text", "long-ids", None, "seeded", "stop"]
    assert [o["id"] for o in got_bad] == [None, "no-prompt", "neg-temp", "top-p", "vocab", "typo"]
    assert_matches(got_good, good, want)
    for o in got_bad:
        assert o["error"]["type"] == "invalid_request" and o["error"]["message"] and o["text"] is None, o
    assert "max_token" in got_bad[-1]["error"]["message"] and "999" in got_bad[-2]["error"]["message"]

    assert summary["requests"] == len(lines) and summary["ok"] == len(good) and summary["errors"] == len(bad)
    assert summary["errors_by_type"] == {"invalid_request": len(bad), "overloaded": 0, "internal": 0}
    assert summary["prompt_tokens"] == sum(w.prompt_tokens for w in want)
    assert summary["completion_tokens"] == sum(w.completion_tokens for w in want)
    assert summary["controller"] == "started" and summary["wall_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["pool"]["peak_size"] >= 1 and summary["pool"]["scale_ups"] >= 1, summary
    assert summary["pool"]["pooled_requests"] >= 2, summary  # the two long prompts used pooled attention
    deadline = time.monotonic() + 30  # the job shuts down the controller, bases and members it started
    while (alive := alive_fapool_actors(ray_head["dashboard"])) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive
    print(f"job {job_s:.1f}s, summary {summary}")


def tiny_ids(rng, n):
    return [rng.randrange(3, 384) for _ in range(n)]  # the tiny model's vocabulary is 384 tokens


@pytest.mark.slow
def test_batch_job_200_lines_through_a_full_queue(ray_head):
    """200 lines in, 200 records out in the directory given, in order. A base queues one request at
    most, so most lines are first refused as "overloaded": they are retried, and every line runs."""
    rng = random.Random(7)
    lines, good = [], {}
    for i in range(1, 201):
        if i % 25 == 7:  # 8 bad lines, counted as invalid requests
            lines.append("{not json" if i % 2 else json.dumps({"id": i, "prompt": "x", "top_p": 0}))
            continue
        line = {"id": i, "prompt_token_ids": tiny_ids(rng, rng.randint(2, 12)), "max_tokens": rng.randint(1, 6),
                "ignore_eos": True}
        lines.append(json.dumps(line))
        good[i] = line
    summary, out, job_s = submit(ray_head, lines, "--device", "cpu", "--max-pool", "0",
                                 "--max-waiting-per-base", "1", "--concurrency", "8")
    assert len(out) == 200 and [o["line"] for o in out] == list(range(1, 201))
    assert all(o["id"] == o["line"] for o in out if o["id"] is not None)
    assert summary["requests"] == 200 and summary["ok"] == 192 and summary["errors"] == 8
    assert summary["errors_by_type"] == {"invalid_request": 8, "overloaded": 0, "internal": 0}
    assert summary["retries"] > 0, summary  # the full queue refused lines, and the job retried them
    assert sum(o["usage"]["completion_tokens"] for o in out if o["error"] is None) == summary["completion_tokens"]
    sample = sorted(good)[::12]
    requests = [(good[i], SamplingParams(max_tokens=good[i]["max_tokens"], temperature=0, ignore_eos=True))
                for i in sample]
    assert_matches([out[i - 1] for i in sample], requests, reference(requests))
    print(f"200 lines {job_s:.1f}s, summary {summary}")

    # Without retries the refusals stay: counted as "overloaded", and the job exits 1.
    lines = [json.dumps({"prompt_token_ids": tiny_ids(rng, 4), "max_tokens": 8, "ignore_eos": True})] * 40
    summary, out, _ = submit(ray_head, lines, "--device", "cpu", "--max-pool", "0", "--max-waiting-per-base", "1",
                             "--concurrency", "16", "--retry-s", "0", rc=1)
    refused = [o for o in out if o["error"] is not None]
    assert refused and all(o["error"]["type"] == "overloaded" for o in refused), out
    assert summary["errors_by_type"] == {"invalid_request": 0, "overloaded": len(refused), "internal": 0}
    assert summary["ok"] == 40 - len(refused) and summary["retries"] == 0


@pytest.mark.slow
def test_benchmark_runs_as_a_ray_job(ray_head):
    """`ray job submit -- python -m bench.run`: pools 0 and 1 side by side, results as JSON."""
    out_dir = Path(tempfile.mkdtemp(dir=ray_head["temp_dir"]))
    res = ray_job(ray_head, "bench.run", "--preset", "tiny", "--device", "cpu", "--pools", "0,1",
                  "--contexts", "48", "--batches", "1,2", "--steps", "3", "--oversized", "0", "--no-hf",
                  "--no-scaleup", "--out", str(out_dir), "--name", "job")
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    result = json.loads((out_dir / "job.json").read_text())
    assert result["preset"] == "tiny" and result["probe"]["copy_bytes_per_s"] > 0
    decode = {(r["pool"], r["batch"]): r for r in result["decode"]}
    assert set(decode) == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert all(r["tpot_s"] > 0 and r["floor_s"] > 0 for r in decode.values())
    assert decode[(1, 2)]["pooled"] == 2 and decode[(0, 2)]["pooled"] == 0  # pool 1 really pooled them
    assert [r["pool"] for r in result["prefill"]] == [0, 1] and result["prefill"][1]["pooled"] == 1
    deadline = time.monotonic() + 30  # the benchmark shuts down the cluster actors it started
    while (alive := alive_fapool_actors(ray_head["dashboard"])) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive


@pytest.mark.slow
def test_batch_job_joins_a_running_controller(ray_head):
    requests = [
        ({"id": "long", "prompt": LONG_TEXT, "max_tokens": 6, "ignore_eos": True},
         SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
        ({"id": "short", "prompt": "Hi", "max_tokens": 5, "ignore_eos": True},
         SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)),
    ]
    lines = [json.dumps(line) for line, _ in requests]
    want = reference(requests)
    first, out1, _ = submit(ray_head, lines, "--device", "cpu", "--pool-curve", "16:1", "--keep-cluster")
    assert first["controller"] == "started" and first["pool"]["peak_size"] == 1
    second, out2, job_s = submit(ray_head, lines, "--device", "cpu", "--max-pool", "0")  # flags ignored
    assert second["controller"] == "existing" and second["ok"] == 2
    assert_matches(out1, requests, want)
    assert_matches(out2, requests, want)
    assert sorted(alive_fapool_actors(ray_head["dashboard"])) == ["AttentionPoolActor", "BaseActor", "PoolController"]
    print(f"joining job {job_s:.1f}s, summary {second}")


@pytest.mark.slow
def test_a_job_killed_midway_is_marked_incomplete_and_a_rerun_finishes_it(ray_head):
    import os
    import signal
    import subprocess

    from serve.batch.output import MARKER, read_marker
    from tests.helpers.ray_head import RAY, REPO, subprocess_env

    in_path = Path(tempfile.mkstemp(suffix=".jsonl", dir=ray_head["temp_dir"])[1])
    out_dir = in_path.with_suffix(".out")
    lines = [json.dumps({"id": f"q{i}", "prompt_token_ids": [3 + i % 200, 7], "max_tokens": 48, "ignore_eos": True})
             for i in range(300)]
    in_path.write_text("\n".join(lines) + "\n")
    cmd = [RAY, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"},
                                             "excludes": [".git", ".venv", ".pytest_cache", "**/__pycache__"]}),
           "--", "python", "-m", "serve.batch", "--input", str(in_path), "--output", str(out_dir), "--device", "cpu"]
    job = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out_dir / MARKER).exists():  # the run has claimed the folder and is writing
            assert time.monotonic() < deadline and job.poll() is None, "the job never started its run"
            time.sleep(0.2)
        time.sleep(3)
        pids = subprocess.run(["pgrep", "-f", f"serve.batch --input {in_path}"], capture_output=True,
                              text=True).stdout.split()
        assert pids, "no driver process to kill"
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)  # kill -9: nothing of the job's own cleanup runs
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    marker = read_marker(str(out_dir))
    assert marker["state"] == "incomplete", marker
    assert not list(out_dir.glob("*.json")), "a killed run's files must not look like results"
    # The same command again: it says so, removes what the killed run wrote, and finishes.
    res = ray_job(ray_head, "serve.batch", "--input", str(in_path), "--output", str(out_dir), "--device", "cpu")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "holds an incomplete run" in log
    records = read_output(out_dir)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(300)] and all(r["error"] is None for r in records)
    assert read_marker(str(out_dir))["state"] == "complete"
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".json")) == [MARKER]  # no staging left
