"""What the chaos and shutdown tests share: a Ray driver attached to a `fapool serve` process's
cluster (to kill its actors), SSE streams collected in threads, and unfaulted references."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx

from fapool import EngineConfig, LLMEngine, SamplingParams

NAMESPACE = "fapool"


def ray_address(server, timeout_s: float = 60) -> str:
    """The GCS address `fapool serve` prints once `serve.run` returns (`/ready` may come first)."""
    deadline = time.monotonic() + timeout_s
    while not (m := re.search(r"Ray at (\S+?)\)", Path(server.log.name).read_text())):
        assert time.monotonic() < deadline, "fapool serve did not print its Ray address"
        time.sleep(0.2)
    return m.group(1)


class Driver:
    """A Ray driver on the server's cluster: finds and kills the app's actors."""

    def __init__(self, server) -> None:
        import ray

        self.ray = ray
        from actors.ray_node import use_loopback

        if ray.is_initialized():  # an earlier test's in-process Ray: this driver joins the server's
            ray.shutdown()
        use_loopback()  # the server's Ray listens on loopback only
        ray.init(address=ray_address(server), namespace=NAMESPACE, logging_level="ERROR",
                 log_to_driver=False)

    def names(self) -> list[str]:
        return [a["name"] for a in self.ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and a["name"].startswith("fapool-serve-")]

    def controller(self):
        from actors.cluster import running_clusters

        [name] = running_clusters("fapool-serve-")
        return self.ray.get_actor(name, namespace=NAMESPACE)

    def base(self, i: int = 0):
        [name] = [n for n in self.names() if n.endswith(f"-base-{i}")]
        return self.ray.get_actor(name, namespace=NAMESPACE)

    def member(self, member_id: int):
        return self.ray.get(self.controller().member_handle.remote(member_id))

    def close(self) -> None:
        self.ray.shutdown()


def reference(ids: list[int], max_tokens: int) -> list[int]:
    engine = _engine()
    return list(engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0].token_ids)


_ENGINE: list[LLMEngine] = []


def _engine() -> LLMEngine:
    if not _ENGINE:
        _ENGINE.append(LLMEngine(EngineConfig(model="tiny", device="cpu")))
    return _ENGINE[0]


def ids_of(n: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 250 for i in range(n)]


class Stream:
    """One streamed `/generate` in a thread: its events ('[DONE]' included) and token ids."""

    def __init__(self, url: str, ids: list[int], max_tokens: int, timeout_s: float = 300,
                 ignore_eos: bool = False) -> None:
        self.ids, self.max_tokens = ids, max_tokens
        self.events: list = []
        self.status: int | None = None
        self.error: Exception | None = None
        self._body = {"prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                      "ignore_eos": ignore_eos}
        self._url, self._timeout_s = url, timeout_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self._url, timeout=self._timeout_s) as c:
                with c.stream("POST", "/generate", json=self._body) as r:
                    self.status = r.status_code
                    if r.status_code != 200:
                        self.events.append(json.loads(r.read()))
                        return
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            data = line[6:]
                            self.events.append(data if data == "[DONE]" else json.loads(data))
        except Exception as e:  # noqa: BLE001 - what the test asserts on
            self.error = e

    def join(self, timeout_s: float = 300) -> "Stream":
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "a stream hangs"
        assert self.error is None, f"the stream broke instead of ending cleanly: {self.error!r}"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, dict) for t in e.get("token_ids", ())]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def finished(self) -> bool:
        """Ended with a finish reason, then [DONE]."""
        return (self.status == 200 and self.events[-1] == "[DONE]" and len(self.events) >= 2
                and self.events[-2].get("finish_reason") in ("length", "stop"))

    def errored(self) -> dict | None:
        """The OpenAI-shaped error the stream ended with (an event before [DONE], or the body)."""
        if self.status == 200:
            if len(self.events) >= 2 and self.events[-1] == "[DONE]" and "error" in self.events[-2]:
                return self.events[-2]["error"]
            return None
        return self.events[-1].get("error") if self.events else None


def wait_tokens(streams: list[Stream], n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while any(s.num_tokens < n and s.thread.is_alive() for s in streams):
        assert time.monotonic() < deadline, "streams did not get going"
        time.sleep(0.1)


def timed_get(client: httpx.Client, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    r = client.get(path, timeout=10)
    return r.status_code, time.monotonic() - t0
