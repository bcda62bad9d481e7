"""Real `fapool serve` processes for the HTTP tests: started once per module, stopped with Ctrl-C
(SIGINT to the process group, as a terminal sends it), leaving no Ray process behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FAPOOL = Path(sys.executable).parent / "fapool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, api_key: str | None = None, env: dict[str, str | None] | None = None) -> None:
        self.api_key = api_key
        self.env = env or {}  # overrides of the test environment; None removes a variable
        for attempt in range(3):
            self._start(flags)
            try:
                self._wait_ready()
                return
            except RuntimeError:
                # The free port can be taken (by one of Ray's own processes) before the server
                # binds it: then, and only then, try another.
                log = Path(self.log.name).read_text(errors="replace")
                if attempt == 2 or not any(m in log for m in ("Failed to bind to address", "already in use")):
                    raise

    def _start(self, flags: tuple[str, ...]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        env.update({k: v for k, v in self.env.items() if v is not None})
        for k in [k for k, v in self.env.items() if v is None]:
            env.pop(k, None)
        self.log = open(f"/tmp/fapool-serve-{self.port}.log", "w")
        args = [str(FAPOOL), "serve", "--port", str(self.port), "--device", "cpu", *flags]
        if self.api_key:
            args += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fapool serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/ready", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"fapool serve did not get ready in {timeout_s}s; see {self.log.name}")

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        finally:
            self.log.close()
        return code


def ray_processes_of(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"session_.*_{pid}"], capture_output=True, text=True).stdout
    return out.split()


def assert_no_ray_left(server: Server, after: str, timeout_s: float = 30) -> None:
    """The Ray processes a stopped `fapool serve` started are all gone within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while ray_processes_of(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes_of(server.proc.pid) == [], f"Ray processes left behind after {after}"


@pytest.fixture(scope="package")
def fapool_server():
    """The main server: tiny model, a small pool curve and a short cooldown; two served names
    (vLLM's --served-model-name), the first being the preset's, as without the flag."""
    server = Server("--pool-curve", "16:1,32:2,64:3", "--pool-cooldown-s", "2", "--max-cpu-members", "3",
                    "--served-model-name", "tiny", "tiny-alias")
    yield server.url
    code = server.stop()
    assert code == 0
    assert_no_ray_left(server, "Ctrl-C")
