"""A real Ray head for tests that need `ray job submit` or `serve deploy`: `ray start --head
--block` in its own process session, temp dir and ports, so it never touches a Ray instance other
tests started. It is stopped by SIGTERM to `ray start --block`, not by `ray stop`, which would kill
every Ray process on the machine; the fixture then checks that no process of it is left."""
from __future__ import annotations

import contextlib
import json
import os
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

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


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
    with started_head() as head:
        yield head


@contextlib.contextmanager
def started_head(extra_env: dict[str, str] | None = None):
    """`ray start --head --block` with its own ports and temp dir; `extra_env` reaches every Ray
    process it starts (Ray Serve reads its settings there)."""
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
    env = {**subprocess_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(extra_env or {})}
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
