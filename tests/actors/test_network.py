"""The data plane never listens on a wildcard address (a real pool on a local Ray cluster, CPU)."""
import os
import re
import subprocess

import ray

from actors.config import ClusterConfig
from fapool import EngineConfig, SamplingParams
from fapool.policy import PolicyConfig, PoolCurve
from tests.actors.conftest import wait_for


def listeners(pid: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if re.search(rf"pid={pid},", line)}


def pid_of(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def plane_listeners(handle) -> set[str]:
    """What the actor's process listens on, but Ray's own worker port (see deploy/README.md)."""
    from ray._private.state import actors

    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    ray_port = actors(actor_id=handle._actor_id.hex())["Address"]["Port"]
    return {a for a in listeners(pid) if not a.endswith(f":{ray_port}")}


def test_the_data_plane_binds_loopback_on_one_node(start_cluster):
    cfg = ClusterConfig(engine=EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096),
                        policy=PolicyConfig(curve=PoolCurve.parse("16:1"), max_pool=1, cooldown_s=60.0),
                        member_kv_capacity_tokens=4096, max_cpu_members=1)
    cluster = start_cluster(cfg)
    base = cluster.bases[0]
    assert plane_listeners(base) == set()  # no pool yet: nothing of ours listens
    out = cluster.generate(None, SamplingParams(max_tokens=4, temperature=0.0), prompt_token_ids=list(range(3, 30)))
    assert out.completion_tokens == 4 and ray.get(base.stats.remote()).pooled_total == 1
    [mid] = wait_for(lambda: cluster.status().members, what="a member")
    member = ray.get(cluster.controller.member_handle.remote(mid))
    base_side, member_side = plane_listeners(base), plane_listeners(member)
    assert base_side and member_side, "the pool's group listens on both sides"
    assert all(a.startswith("127.0.0.1:") for a in base_side | member_side), (base_side, member_side)
