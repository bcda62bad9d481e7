"""The serve options (CLI flags, `serve_config.yaml` args) as one pydantic model at the edge."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.config import ClusterConfig
from fapool.config import PRESETS, EngineConfig
from fapool.policy import DEFAULT_CURVE, PolicyConfig, PoolCurve
from fapool.weights import check_model_dir

if TYPE_CHECKING:  # serve.service brings Ray: flag checks must stay fast
    from serve.service import ServeLimits


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"  # "tiny" (embedded, no download), "paper", or a Hugging Face-format directory
    device: str = "auto"  # auto | cpu | cuda
    base_actors: int = Field(1, ge=1)
    max_pool: int = Field(32, ge=0, le=32)
    pool_curve: str = DEFAULT_CURVE
    pool_cooldown_s: float = Field(30.0, ge=0)
    accelerator_type: str | None = None
    api_key: str | None = None  # None: FAPOOL_API_KEY if set, else no key
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    kv_capacity_tokens: int | None = Field(None, ge=1)
    member_kv_capacity_tokens: int | None = Field(None, ge=1)
    max_cpu_members: int | None = Field(None, ge=0, le=32)  # None: one per CPU core the bases leave free
    max_inflight: int = Field(1024, ge=1)
    max_waiting_per_base: int = Field(256, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    pool_wait_s: float = Field(30.0, ge=0)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        # Fail here, in a second and in one line, not in a base actor after Ray has started.
        if v in PRESETS:
            return v
        if not os.path.isdir(v):
            raise ValueError(f"{v!r} is neither a preset ({', '.join(PRESETS)}) nor a directory; "
                             "give a Hugging Face-format model directory")
        check_model_dir(v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={v!r}; use auto, cpu or cuda")
        return v

    @field_validator("pool_curve")
    @classmethod
    def _curve(cls, v: str) -> str:
        PoolCurve.parse(v)  # raises ValueError naming the bad point
        return v

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("FAPOOL_API_KEY") or None

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig(
            engine=EngineConfig(model=self.model, device=self.device, kv_capacity_tokens=self.kv_capacity_tokens),
            policy=PolicyConfig(curve=PoolCurve.parse(self.pool_curve), max_pool=self.max_pool,
                                cooldown_s=self.pool_cooldown_s),
            num_base_actors=self.base_actors,
            accelerator_type=self.accelerator_type,
            member_kv_capacity_tokens=self.member_kv_capacity_tokens,
            max_cpu_members=self.max_cpu_members,
            pool_wait_s=self.pool_wait_s,
            max_waiting_per_base=self.max_waiting_per_base,
        )

    def limits(self) -> ServeLimits:
        from serve.service import ServeLimits

        return ServeLimits(max_inflight=self.max_inflight, request_timeout_s=self.request_timeout_s,
                           max_body_bytes=self.max_body_bytes)
