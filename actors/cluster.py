"""The local entry point: start or join a Ray cluster, start (or explicitly join) an FA Pool
cluster, and generate. `serve/` builds on this; tests and scripts use it directly:

    with Cluster.start(ClusterConfig()) as cluster:
        print(cluster.generate("Hello", SamplingParams(max_tokens=16, temperature=0)).text)
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import ray

from actors import ray_node
from actors.config import NAMESPACE, ClusterConfig
from actors.feeds import Feed, run_request
from actors.messages import GenerateRequest, PoolStatus
from actors.ray_node import LOOPBACK
from actors.supervisor import Supervisor, is_base_name
from fapool.errors import ErrorType, RequestError
from fapool.sampling import SamplingParams
from fapool.sequence import Completion, RequestOutput


def connect(address: str | None = None, *, ray_host: str = LOOPBACK, **init_kwargs: Any) -> Any:
    """Join `address` (or RAY_ADDRESS), else start a local Ray instance on `ray_host` (loopback:
    reachable by this machine's users only; see actors/ray_node.py). Idempotent; returns
    ray.init's context (None if Ray was already initialized)."""
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray_node.join(address, namespace=NAMESPACE, **init_kwargs)
    return ray_node.start_local(ray_host, namespace=NAMESPACE, **init_kwargs)


def running_clusters(prefix: str) -> list[str]:
    """The names of the running clusters (their controllers) that start with `prefix`."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(prefix) and not is_base_name(a["name"])]


class Cluster:
    """A client of one FA Pool cluster. `start` creates a new cluster that this process owns
    (under a unique name unless one is given); `join` attaches to a running one by name. Nothing
    ever joins a cluster by accident, so a job's exit never touches another app's actors."""

    def __init__(self, controller: Any, supervisor: Supervisor | None = None) -> None:
        self._controller = controller
        self.supervisor = supervisor
        self.name = supervisor.name if supervisor is not None else None
        self._bases = ray.get(controller.get_bases.remote()) if supervisor is None else None
        self._inflight = [0] * len(self.bases)  # this client's requests per base
        self._next = 0
        self._lock = threading.Lock()  # `generate` may be called from many threads (the batch job)
        self._feeds: dict[int, Feed] = {}

    @classmethod
    def start(cls, cfg: ClusterConfig, address: str | None = None, *, name: str | None = None,
              detached: bool = False, **init_kwargs: Any) -> "Cluster":
        """Start a new cluster. `name` (default: unique) names its controller, and its bases
        `NAME-base-I`; a name already in use is an error, never a join. A `detached` cluster
        outlives this process (see `actors/supervisor.py`)."""
        connect(address, **init_kwargs)
        name = name or f"fapool-{uuid.uuid4().hex[:10]}"
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ValueError(f"an FA Pool cluster named {name!r} is already running; "
                             f"use Cluster.join({name!r}) to use it, or start one under another name")
        return cls(None, Supervisor(cfg, name, detached).start())  # type: ignore[arg-type]

    @classmethod
    def join(cls, name: str, address: str | None = None, **init_kwargs: Any) -> "Cluster":
        """Use a running cluster (raises ValueError if none has this name). `shutdown` of a
        joined cluster leaves it running."""
        connect(address, **init_kwargs)
        controller = ray.get_actor(name, namespace=NAMESPACE)
        ray.get(controller.start.remote())  # waits until its bases are attached
        c = cls(controller)
        c.name = name
        return c

    @property
    def controller(self) -> Any:
        return self.supervisor.controller if self.supervisor is not None else self._controller

    @property
    def bases(self) -> list[Any]:
        return self.supervisor.bases if self.supervisor is not None else self._bases

    @property
    def healthy(self) -> list[bool]:
        """Per base: it answered the supervisor's latest ping (a joined cluster: assumed so)."""
        return list(self.supervisor.healthy) if self.supervisor is not None else [True] * len(self.bases)

    def inflight(self) -> int:
        """This client's requests in flight, all bases together."""
        return sum(self._inflight)

    def pick_base(self) -> int | None:
        """The index of the healthy base with the fewest of this client's requests in flight,
        round-robin among equals; None while no base is healthy (they are restarting)."""
        n, healthy = len(self.bases), self.healthy
        with self._lock:
            order = [(self._next + i) % n for i in range(n) if healthy[(self._next + i) % n]]
            self._next = (self._next + 1) % n
            return min(order, key=lambda i: self._inflight[i]) if order else None

    def _picked(self) -> int:
        b = self.pick_base()
        if b is None:  # transient: the supervisor restarts them, so a retry may succeed
            raise RequestError("no base actor can generate right now (restarting); retry shortly",
                               ErrorType.OVERLOADED)
        return b

    @contextmanager
    def using(self, b: int) -> Iterator[Any]:
        """Base `b`'s handle, counted as one of this client's requests in flight until exit."""
        with self._lock:
            self._inflight[b] += 1
        try:
            yield self.bases[b]
        finally:
            with self._lock:
                self._inflight[b] -= 1

    def feed(self, b: int) -> Feed:
        """This process's feed to base `b` (all its streamed requests there in one Ray stream); a
        new one after the last one failed or the base was created again. Use from one event loop."""
        f = self._feeds.get(b)
        if f is None or not f.alive or f.base is not self.bases[b]:
            f = self._feeds[b] = Feed(self.bases[b])
        return f

    def stream(self, req: GenerateRequest, base: Any = None) -> Iterator[RequestOutput]:
        """Blocking: run `req` on `base` (default: `pick_base`'s); its events as they come, the
        last one finished (through a feed of its own: `actors/feeds.py`)."""
        if base is None:
            base = self.bases[self._picked()]
        return run_request(base, req)

    def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams = SamplingParams(),
        *,
        prompt_token_ids: list[int] | None = None,
        base: Any = None,
    ) -> Completion:
        """Blocking: run one request to the end, on `base` or the one `pick_base` gives. Raises
        `RequestError` whose `.type` says why: fix the request, retry it later, or report it."""
        rid = f"gen-{uuid.uuid4().hex[:12]}"
        ids = tuple(prompt_token_ids) if prompt_token_ids is not None else None
        b = self._picked() if base is None else next((i for i, h in enumerate(self.bases) if h == base), None)
        with (self.using(b) if b is not None else nullcontext(base)) as handle:
            try:
                events = list(self.stream(GenerateRequest(rid, params, prompt, ids), handle))
            except ray.exceptions.RayActorError as e:
                raise RequestError(f"the base actor serving this request died; retry it ({e})",
                                   ErrorType.INTERNAL) from None
        if events[-1].finish_reason == "error":
            raise RequestError(events[-1].error or "the request failed", ErrorType.of(events[-1].error_type))
        return Completion.of(events)

    def status(self) -> PoolStatus:
        return ray.get(self.controller.status.remote())

    def shutdown(self) -> None:
        """Stop the cluster this process started (members, controller, bases); a joined
        cluster is left running."""
        for f in self._feeds.values():
            f.shutdown()
        if self.supervisor is None:
            return
        self.supervisor.shutdown()
        # The name is free again only once Ray has seen the controller die.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(self.supervisor.name, namespace=NAMESPACE)
            except ValueError:
                return
            time.sleep(0.1)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
