"""What listens on `--port`: the ingress replica itself (`--ingress direct`, the default when
`fapool serve` starts Ray) or Serve's proxy (`--ingress proxy`). Both serve the same exact tokens; a
killed direct replica comes back on the same port; bad combinations are refused before Ray starts."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.listeners import PROXY, REPLICA, cmdline, listener
from tests.serve.chaos_helpers import Stream, ids_of, reference
from tests.serve.conftest import FAPOOL, REPO, Server, assert_no_ray_left, free_port


def proxy_port(server: Server, timeout_s: float = 60) -> int:
    """Where `fapool serve` says Serve's proxy is, once `serve.run` returns (`/ready` may come first)."""
    deadline = time.monotonic() + timeout_s
    while not (m := re.search(r"Serve's proxy on port (\d+)", Path(server.log.name).read_text())):
        assert time.monotonic() < deadline, "fapool serve did not say where Serve's proxy is"
        time.sleep(0.2)
    return int(m.group(1))


def ingress_replica_pids(server: Server) -> list[int]:
    """The Serve replica processes of this server's own Ray (its process session)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if cmdline(int(entry)).startswith(REPLICA) and os.getsid(int(entry)) == server.proc.pid:
                pids.append(int(entry))
        except OSError:  # it exited meanwhile
            pass
    return pids


def exact_stream(url: str, seed: int) -> None:
    ids = ids_of(12, seed)
    s = Stream(url, ids, 6).join(120)
    assert s.finished(), s.events[-3:]
    assert s.tokens == reference(ids, 6)


def stop_cleanly(server: Server) -> None:
    assert server.stop() == 0
    assert_no_ray_left(server, "Ctrl-C")


def test_direct_ingress_serves_the_port_and_a_killed_replica_comes_back_on_it():
    server = Server()  # --ingress auto: this command starts Ray, so direct
    try:
        assert listener(server.port).startswith(REPLICA)
        assert listener(proxy_port(server)).startswith(PROXY)
        exact_stream(server.url, 1)

        [pid] = ingress_replica_pids(server)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the ingress did not come back on its port in 120 s"
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ingress_replica_pids(server) not in ([], [pid])
        assert listener(server.port).startswith(REPLICA)
        exact_stream(server.url, 2)
    finally:
        stop_cleanly(server)


def test_proxy_ingress_serves_the_same_tokens():
    server = Server("--ingress", "proxy")
    try:
        assert listener(server.port).startswith(PROXY)
        assert "direct ingress" not in Path(server.log.name).read_text()
        exact_stream(server.url, 3)
    finally:
        stop_cleanly(server)


def run_cli(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(RAY_AUTH_MODE="disabled", **(env or {}))
    return subprocess.run([str(FAPOOL), "serve", "--device", "cpu", *flags], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=60)


def test_a_port_in_use_is_refused_before_ray_starts():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = run_cli("--port", str(port))
    assert res.returncode == 2
    assert f"--port {port} on 127.0.0.1 is already in use" in res.stderr
    assert "Started a local Ray instance" not in res.stdout + res.stderr


@pytest.mark.parametrize("how", [("--address", "127.0.0.1:1"), ("RAY_ADDRESS", "127.0.0.1:1")])
def test_direct_ingress_on_a_cluster_it_did_not_start_is_refused(how):
    key, value = how
    flags, env = ((key, value), None) if key.startswith("--") else ((), {key: value})
    res = run_cli("--ingress", "direct", "--port", str(free_port()), *flags, env=env)
    assert res.returncode == 2
    assert "--ingress direct" in res.stderr and "--ingress proxy" in res.stderr
