"""How many pool members the cluster can hold: free GPUs on CUDA, free cores on CPU.

On CUDA every member takes a GPU, so Ray's own accounting bounds the pool. On CPU members take no
Ray resource (`num_cpus=0`, like every FA Pool actor), so Ray would place any number of them on
one node, where they share its cores with the bases and make every step slower while a long prompt
waits for them. There, the pool is bounded by the cores the bases leave free (one member each),
or by `ClusterConfig.max_cpu_members` when set.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.config import ClusterConfig

log = logging.getLogger(__name__)


def on_cuda(cfg: ClusterConfig) -> bool:
    dev = cfg.engine.device
    return dev.startswith("cuda") or (dev == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def pool_capacity(cfg: ClusterConfig, held: int) -> int:
    """Members the cluster can hold now: the `held` ones plus what free resources allow."""
    per = cfg.gpus_per_actor(on_cuda(cfg))
    if per > 0:
        free = ray.available_resources().get("GPU", 0.0)
        return held + int(free // per)
    return min(cfg.policy.max_pool, cpu_member_cap(cfg))


def cpu_member_cap(cfg: ClusterConfig) -> int:
    if cfg.max_cpu_members is not None:
        return cfg.max_cpu_members
    return max(0, int(_cluster_cpus()) - cfg.num_base_actors)


_cpus: list[float] = []  # (time, CPUs): the controller asks every tick, the GCS need not answer each


def _cluster_cpus(max_age_s: float = 10.0) -> float:
    if not _cpus or time.monotonic() - _cpus[0] > max_age_s:
        _cpus[:] = [time.monotonic(), ray.cluster_resources().get("CPU", 0.0)]
    return _cpus[1]


def request_gpus(cfg: ClusterConfig, num_bases: int, members: int) -> bool:
    """Ask the Ray autoscaler for the bases' GPUs and `members` members' (their GPU and
    `member_resources`); a no-op on CPU. Whether the request was made."""
    per = cfg.gpus_per_actor(on_cuda(cfg))
    extra = dict(cfg.member_resources)
    if per <= 0 and not extra:
        return False
    base = {"GPU": per} if per > 0 else {}
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=([base] * num_bases if base else []) + [{**base, **extra}] * members)
        return True
    except Exception as e:  # noqa: BLE001 - no autoscaler on a fixed cluster
        log.debug("request_resources: %s", e)
        return False
