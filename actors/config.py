"""Cluster-level configuration: how many base actors, how the pool scales, where actors go."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fapool.config import EngineConfig
from fapool.policy import PolicyConfig

CONTROLLER_NAME = "fapool-controller"  # the name a job passes to share a kept cluster (serve.batch)
NAMESPACE = "fapool"


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    num_base_actors: int = 1  # `--base-actors`
    accelerator_type: str | None = None  # `--accelerator-type`, e.g. "A100" or "H100"
    actor_num_gpus: float | None = None  # GPUs per base/pool actor; None: 1 on CUDA, 0 on CPU
    member_kv_capacity_tokens: int | None = None  # None: from the member's free memory
    pool_wait_s: float = 30.0  # how long a long prompt waits for a growing pool before running alone
    data_plane_timeout_s: float = 60.0
    tick_s: float = 0.25  # how often the controller re-applies the policy
    max_events: int = 256  # scale events kept for /pool and the dashboard
    max_waiting_per_base: int = 256  # beyond this a base refuses new requests (HTTP 429)
    standby_members: int = 0  # pool actors kept started but idle, so growth skips actor start-up
    profile: bool = False  # time step phases (attention, waiting on the pool, merge) for benchmarks
    # Pool members on CPU reserve no Ray resource, so Ray would place any number on one node and
    # they would fight for its cores. None: one member per CPU core the bases leave free.
    max_cpu_members: int | None = None
    supervise_every_s: float = 0.5  # how often the supervisor pings the controller and bases
    # A member Ray has not placed and started by then is given up (no GPU free, or none with the
    # resources asked for): the pool shows it pending and the controller retries with backoff.
    member_start_timeout_s: float = 180.0
    member_resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources each pool member asks for

    def __post_init__(self) -> None:
        if self.num_base_actors < 1:
            raise ValueError(f"num_base_actors={self.num_base_actors}; use at least 1")
        if self.max_waiting_per_base < 1:
            raise ValueError(f"max_waiting_per_base={self.max_waiting_per_base}; use at least 1")
        if self.max_cpu_members is not None and self.max_cpu_members < 0:
            raise ValueError(f"max_cpu_members={self.max_cpu_members}; use 0 or more")

    def gpus_per_actor(self, on_cuda: bool) -> float:
        if self.actor_num_gpus is not None:
            return self.actor_num_gpus
        return 1.0 if on_cuda else 0.0

    def actor_options(self, on_cuda: bool) -> dict[str, Any]:
        """Ray options for base and pool actors: one GPU each, no CPU reservation."""
        opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": self.gpus_per_actor(on_cuda)}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts

    def replace(self, **changes: Any) -> "ClusterConfig":
        return dataclasses.replace(self, **changes)
