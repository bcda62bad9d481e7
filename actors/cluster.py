"""The local entry point: start or join a Ray cluster, start the controller and base actors,
and generate. `serve/` builds on this; tests and scripts use it directly:

    with Cluster.start(ClusterConfig()) as cluster:
        print(cluster.generate("Hello", SamplingParams(max_tokens=16, temperature=0)).text)
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray

from actors.config import CONTROLLER_NAME, NAMESPACE, ClusterConfig
from actors.controller import PoolController
from actors.messages import GenerateRequest, PoolStatus, TokenEvent
from fapool.sampling import SamplingParams


@dataclass(frozen=True)
class Generation:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local Ray instance. Idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, namespace=NAMESPACE, **init_kwargs)


def get_or_create_controller(cfg: ClusterConfig):
    """The named, detached controller; created (and its bases started) if absent."""
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        # FAPOOL_* switches (attention kernel, Triton decode) set where the cluster is started
        # reach every actor: Ray hands the controller's runtime_env down to the actors it creates.
        env = {k: v for k, v in os.environ.items() if k.startswith("FAPOOL_")}
        controller = (
            ray.remote(PoolController)
            .options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                     max_concurrency=1000, get_if_exists=True,
                     **({"runtime_env": {"env_vars": env}} if env else {}))
            .remote(cfg)
        )
    ray.get(controller.start.remote())
    return controller


class Cluster:
    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.bases = ray.get(controller.get_bases.remote())
        self._rr = itertools.count()

    @classmethod
    def start(cls, cfg: ClusterConfig, address: str | None = None, **init_kwargs: Any) -> "Cluster":
        connect(address, **init_kwargs)
        return cls(get_or_create_controller(cfg))

    def pick_base(self) -> Any:
        return self.bases[next(self._rr) % len(self.bases)]

    def submit(self, req: GenerateRequest, base: Any = None):
        """Start a request; returns Ray's streaming generator of refs to `TokenEvent` tuples."""
        base = base if base is not None else self.pick_base()
        return base.generate.options(num_returns="streaming").remote(req)

    async def stream(self, req: GenerateRequest, base: Any = None) -> AsyncIterator[TokenEvent]:
        gen = self.submit(req, base)
        async for ref in gen:
            for ev in await ref:
                yield ev

    def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams = SamplingParams(),
        *,
        prompt_token_ids: list[int] | None = None,
        base: Any = None,
    ) -> Generation:
        """Blocking: run one request to the end. Raises `ValueError` for a refused request."""
        rid = f"gen-{uuid.uuid4().hex[:12]}"
        ids = tuple(prompt_token_ids) if prompt_token_ids is not None else None
        text, tokens, last = [], [], None
        for ref in self.submit(GenerateRequest(rid, params, prompt, ids), base):
            for last in ray.get(ref):
                text.append(last.text)
                tokens += last.token_ids
        assert last is not None and last.finish_reason is not None
        if last.finish_reason == "error":
            raise ValueError(last.error)
        return Generation(rid, "".join(text), tuple(tokens), last.finish_reason,
                          last.prompt_tokens, last.completion_tokens)

    def status(self) -> PoolStatus:
        return ray.get(self.controller.status.remote())

    def shutdown(self) -> None:
        """Stop the controller, its bases and pool members."""
        try:
            ray.get(self.controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.controller)
        # The controller's name is free again only once Ray has seen it die.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            except ValueError:
                return
            time.sleep(0.1)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
