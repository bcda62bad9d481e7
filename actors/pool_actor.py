"""`AttentionPoolActor`: one pool member, one GPU; holds KV shards and computes attention blocks."""
from __future__ import annotations

import logging
import threading

import ray
import torch

from fapool.attention import select_kernel
from fapool.config import ModelConfig
from fapool.pool.kv_store import KVCache, capacity_from_memory
from fapool.loader import DTYPES, resolve_device
from fapool.pool.membership import JoinSpec, MemberInfo
from fapool.pool.shard_server import ShardServer
from fapool.pool.transport import DataPlane

log = logging.getLogger(__name__)


class AttentionPoolActor:
    def __init__(
        self,
        member_id: int,
        model_cfg: ModelConfig,
        dtype: str,
        device: str,
        kv_capacity_tokens: int | None,
        attention_kernel: str,
        timeout_s: float,
        profile: bool = False,
    ) -> None:
        self.member_id = member_id
        self.cfg = model_cfg
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            # Ray shows each actor only its own GPU: index 0 unless a device was named.
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        torch_dtype = DTYPES[dtype]
        capacity = kv_capacity_tokens or capacity_from_memory(model_cfg, torch_dtype, self.device, 0.85)
        self.cache = KVCache(model_cfg, capacity, torch_dtype, self.device)
        self.kernel = select_kernel(self.device, attention_kernel, dtype=torch_dtype)
        self.timeout_s = timeout_s
        self.profile = profile
        self._phase_totals: dict[str, float] = {}
        self._steps = 0
        self._servers: dict[tuple[int, int], ShardServer] = {}
        self._lock = threading.Lock()

    def info(self) -> MemberInfo:
        return MemberInfo(self.member_id, self.cache.capacity_tokens, ray.util.get_node_ip_address())

    def join(self, spec: JoinSpec) -> None:
        """Join a base's group for an epoch in the background; the base's rendezvous completes it."""
        threading.Thread(target=self._serve, args=(spec,), daemon=True, name=f"shards-b{spec.base_id}").start()

    def _serve(self, spec: JoinSpec) -> None:
        key = (spec.base_id, spec.epoch)
        server = None
        try:
            plane = DataPlane.connect(
                None, spec.store_host, spec.store_port, f"epoch{spec.epoch}/", spec.rank,
                spec.world_size, self.device, self.timeout_s,
            )
            server = ShardServer(spec.base_id, plane, self.cache, self.kernel, self.cfg, self.profile)
            with self._lock:
                self._servers[key] = server
            server.serve()
            plane.close()
        except Exception as e:  # noqa: BLE001 - a broken group: the base recomputes its sequences
            log.warning("member %d: group of base %d epoch %d ended: %s", self.member_id, *key, e)
            if server is not None:
                server.drop_own()
        finally:
            with self._lock:
                self._servers.pop(key, None)
                if server is not None:
                    self._steps += server.steps
                    for name, sec in server.phase_totals.items():
                        self._phase_totals[name] = self._phase_totals.get(name, 0.0) + sec

    def stats(self) -> dict[str, float]:
        """Counters, and with profiling the seconds spent per phase (attention) over all steps."""
        with self._lock:
            groups = len(self._servers)
            steps = self._steps + sum(s.steps for s in self._servers.values())
            phases = dict(self._phase_totals)
            for s in self._servers.values():
                for name, sec in s.phase_totals.items():
                    phases[name] = phases.get(name, 0.0) + sec
        return {
            "member_id": self.member_id,
            "groups": groups,
            "steps": steps,
            **phases,  # decode_steps, decode_attention (s), prefill_steps, prefill_attention (s)
            "shards": len(self.cache.seq_ids()),
            "kv_used_tokens": self.cache.reserved_tokens,
            "kv_capacity_tokens": self.cache.capacity_tokens,
        }

    def ping(self) -> int:
        return self.member_id
