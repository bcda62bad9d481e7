"""End to end: `ray job submit -- python -m serve.batch` (Ray Data) on a real Ray head started by `ray start`.

The head runs in its own process session with its own temp dir and ports, so it never touches a
Ray instance other tests started. It is stopped by SIGTERM to `ray start --block`, not by
`ray stop`, which would kill every Ray process on the machine.
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from serve.batch import main
from serve.batch_lines import BatchRequest, parse_line

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
LONG_TEXT = "FA Pool spreads the attention of long contexts over a pool of actors. " * 2  # > 40 tokens


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    return env


def session_processes(head_pid, temp_dir):
    """Pids of this head's processes: its process session (gcs, raylet, workers) or naming its temp dir."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(int(entry)) == head_pid or temp_dir in cmdline:
                found.append((int(entry), cmdline[:200]))
        except OSError:  # it exited meanwhile
            pass
    return found


def alive_fapool_actors(dashboard):
    res = subprocess.run([RAY, "list", "actors", "--address", dashboard, "--filter", "state=ALIVE", "--format", "json"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout.strip()
    if not text.startswith("["):
        assert text.startswith("No resource"), text  # what `ray list` prints for an empty list
        return []
    names = {"PoolController", "BaseActor", "AttentionPoolActor"}
    return [a["class_name"] for a in json.loads(text) if a["class_name"] in names]


def ray_job(head, module, *args):
    """`ray job submit -- python -m module args` on the head, with this repository as working dir."""
    cmd = [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({
               "env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"},
               "excludes": [".git", ".venv", ".pytest_cache", "**/__pycache__"]}),
           "--", "python", "-m", module, *args]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


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


def wait_http_ok(url, proc, log_path, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{Path(log_path).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout_s}s:\n{Path(log_path).read_text()[-4000:]}")


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's Unix socket paths under it must stay below 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="fpb-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    log_path = os.path.join(temp_dir, "ray_start.log")
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           "--min-worker-port=0", "--max-worker-port=0"]
    # No drain on SIGTERM: it would wait up to 30 s for the actors a kept cluster leaves running.
    env = {**subprocess_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http_ok(f"http://127.0.0.1:{dash}/api/jobs/", proc, log_path)
        # The teardown check must see the head's processes: make sure it sees them now.
        deadline = time.monotonic() + 30
        while not ("gcs_server" in (seen := " ".join(c for _, c in session_processes(proc.pid, temp_dir)))
                   and "raylet" in seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "gcs_server" in seen and "raylet" in seen, seen
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs_port": gcs, "temp_dir": temp_dir}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` kills the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 20
        while (left := session_processes(proc.pid, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, _ in left:  # don't leak them even when the assertion below fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes outlived the head: {left}"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", gcs)) != 0, "the GCS port still answers"


# ---- the input format, without Ray ------------------------------------------------------------
def test_parse_line_defaults_and_errors():
    req = parse_line(3, json.dumps({"prompt": "hi"}))
    assert isinstance(req, BatchRequest) and (req.line, req.id) == (3, None)
    assert req.params == SamplingParams(max_tokens=64, temperature=0.0)  # greedy: the batch's one difference
    req = parse_line(4, json.dumps({"id": "x", "prompt_token_ids": [1, 2], "stop": "ab", "ignore_eos": True,
                                    "presence_penalty": 0.5}))
    assert req.prompt_token_ids == [1, 2] and req.params.stop == ("ab",) and req.params.ignore_eos
    assert req.params.presence_penalty == 0.5  # the fields of POST /generate, applied the same way
    cases = {
        "{bad": "not valid JSON",
        "[1, 2]": "a line must be a JSON object",
        '{"id": "a"}': "exactly one of prompt",
        '{"prompt": "a", "prompt_token_ids": [1]}': "exactly one of prompt",
        '{"prompt": "a", "max_tokens": 0}': "max_tokens",
        '{"prompt": "a", "max_tokens": "4"}': "max_tokens",
        '{"prompt": "a", "top_p": 0}': "top_p",
        '{"prompt": "a", "prompt_token_ids": null, "temprature": 1}': "temprature",
        '{"prompt_token_ids": [1, true]}': "prompt_token_ids",
        '{"prompt": "a", "stream": true}': "stream",
        '{"prompt": "a", "logprobs": 2}': "logprobs",
        '{"prompt": "a", "max_tokens": 2, "min_tokens": 3}': "min_tokens",
    }
    for line, want in cases.items():
        rec = parse_line(9, line)
        assert isinstance(rec, dict) and rec["error"]["type"] == "invalid_request" and rec["line"] == 9, line
        assert rec["error"]["message"].startswith("line 9: ") and want in rec["error"]["message"], rec


def test_bad_arguments_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output", out]) == 2
    assert "nope.jsonl" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["--input", "in.jsonl", "--output", out]) == 2  # relative: would land in Ray's cache
    assert "relative path" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", out]) == 2  # never deletes other files
    assert "notes.txt" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", out + "2", "--max-pool", "40"]) == 2
    assert "--max-pool" in capsys.readouterr().err
    # A URI that exists is refused before anything starts: remote data is never replaced.
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", "file://" + out]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "notes.txt").exists()


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
