"""The settings of `fapool serve`, `serve_config.yaml` and `python -m serve.batch`: one pydantic model
at the edge, from which the command-line flags are derived (`add_flags`), so a setting is declared,
documented and validated once. A field `foo_bar` is the flag `--foo-bar`; its description is the help.
"""
from __future__ import annotations

import argparse
import os
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from actors.config import ClusterConfig
from fapool.config import ATTENTION_KERNELS, PRESETS, EngineConfig
from fapool.policy import DEFAULT_CURVE, MAX_POOL, MODES, PolicyConfig, PoolCurve
from fapool.weights import check_model_dir

if TYPE_CHECKING:  # serve.service brings Ray: flag checks must stay fast
    from serve.http_limits import HttpLimits
    from serve.service import ServeLimits

DEVICES = ("auto", "cpu", "cuda")
Options = TypeVar("Options", bound=BaseModel)


class ClusterOptions(BaseModel):
    """What an FA Pool cluster is made of: the flags `fapool serve` and the batch job share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="a preset: 'tiny' (embedded), 'paper' (the paper's 1.3 B "
                                                "shape) or 'llama8b' (Llama-3.1-8B's shape), random weights; or a "
                                                "Hugging Face model directory")
    device: str = Field("auto", description="where the model runs; auto: cuda if available",
                        json_schema_extra={"choices": DEVICES})
    base_actors: int = Field(1, ge=1, description="base actors (one GPU each)")
    max_pool: int = Field(MAX_POOL, ge=0, le=MAX_POOL, description="attention pool actors at most (0..32)")
    pool_curve: str = Field(DEFAULT_CURVE, description="pool size by longest context, LEN:SIZE,...")
    pool_cooldown_s: float = Field(30.0, ge=0, description="seconds before the pool shrinks")
    pool_policy: str | None = Field(None, description="slo: the fewest members whose predicted step meets "
                                    "--tpot-slo-ms/--ttft-slo-ms; curve: --pool-curve; default: curve when "
                                    "--pool-curve is not the paper's, else slo", json_schema_extra={"choices": MODES})
    tpot_slo_ms: float = Field(PolicyConfig.tpot_slo_ms, gt=0, description="target decode step of a base (slo policy)")
    ttft_slo_ms: float = Field(PolicyConfig.ttft_slo_ms, gt=0, description="target prefill of the longest "
                                                                           "prompt in flight (slo policy)")
    accelerator_type: str | None = Field(None, description="pin actors to one GPU model, e.g. A100 or H100")
    kv_capacity_tokens: int | None = Field(None, ge=1, description="KV cache per base; None: from free memory")
    member_kv_capacity_tokens: int | None = Field(None, ge=1,
                                                  description="KV cache per pool actor; None: from free memory")
    max_cpu_members: int | None = Field(None, ge=0, le=MAX_POOL,
                                        description="pool actors at most on CPU; None: one per core the "
                                                    "base actors leave free")
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, ge=1, description="sequences a base runs at once "
                                                                           "(its decode batch) at most")
    max_prefill_tokens: int = Field(EngineConfig.max_prefill_tokens, ge=1,
                                    description="prompt tokens a step prefills beside the decodes (chunked "
                                                "prefill): larger fills the GPU better, smaller keeps "
                                                "running streams' token gaps short")
    max_waiting_per_base: int = Field(256, ge=1, description="requests queued on a base before it refuses "
                                                             "more as overloaded (HTTP 429)")
    pool_wait_s: float = Field(30.0, ge=0, description="how long a long prompt waits for a growing pool")
    torch_compile: bool | None = Field(None, description="fuse each layer's elementwise chains with "
                                                          "torch.compile; default: on CUDA, off on CPU")
    attention_kernel: str = Field("auto", description="attention kernel of bases and pool members; auto: "
                                                      "flash4 (Hopper+), flash2 (Ampere), sdpa (CUDA), else reference",
                                  json_schema_extra={"choices": ATTENTION_KERNELS})

    prefix_caching: bool = Field(EngineConfig.prefix_caching,
                                 description="reuse the KV pages of a cached prompt prefix (a long document, a "
                                             "chat history); --no-prefix-caching prefills every prompt whole")

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

    @field_validator("device", "pool_policy", "attention_kernel")
    @classmethod
    def _one_of(cls, v: str | None, info: ValidationInfo) -> str | None:
        choices = {"device": DEVICES, "pool_policy": MODES, "attention_kernel": ATTENTION_KERNELS}[info.field_name]
        if v is not None and v not in choices:  # pool_policy None: chosen from --pool-curve
            raise ValueError(f"{info.field_name}={v!r}; use one of {', '.join(choices)}")
        return v

    @field_validator("pool_curve")
    @classmethod
    def _curve(cls, v: str) -> str:
        PoolCurve.parse(v)  # raises ValueError naming the bad point
        return v

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig(
            engine=EngineConfig(model=self.model, device=self.device, kv_capacity_tokens=self.kv_capacity_tokens,
                                torch_compile=self.torch_compile, max_num_seqs=self.max_num_seqs,
                                max_prefill_tokens=self.max_prefill_tokens, attention_kernel=self.attention_kernel,
                                prefix_caching=self.prefix_caching),
            policy=PolicyConfig(curve=PoolCurve.parse(self.pool_curve), max_pool=self.max_pool,
                                cooldown_s=self.pool_cooldown_s, tpot_slo_ms=self.tpot_slo_ms,
                                ttft_slo_ms=self.ttft_slo_ms,
                                mode=self.pool_policy or ("slo" if self.pool_curve == DEFAULT_CURVE else "curve")),
            num_base_actors=self.base_actors,
            accelerator_type=self.accelerator_type,
            member_kv_capacity_tokens=self.member_kv_capacity_tokens,
            max_cpu_members=self.max_cpu_members,
            pool_wait_s=self.pool_wait_s,
            max_waiting_per_base=self.max_waiting_per_base,
        )


class ServeOptions(ClusterOptions):
    """`fapool serve` and the args of `serve_config.yaml`: the cluster plus the HTTP front door."""

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to accept remote clients")
    port: int = Field(8000, ge=1, le=65535, description="port to bind")
    api_key: str | None = Field(None, description="require this key on every route but /health "
                                                  "(or FAPOOL_API_KEY)")
    max_inflight: int = Field(1024, ge=1, description="requests in flight before HTTP 429")
    request_timeout_s: float = Field(600.0, gt=0, description="a longer request ends with HTTP 504")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="larger request bodies get HTTP 413")
    stream_chunks_per_s: float = Field(1000.0, gt=0, description="HTTP chunks a second this server's streams "
                                                                 "send together: each stream gathers its events "
                                                                 "for streams/rate seconds (at most 0.1)")
    body_read_timeout_s: float = Field(10.0, gt=0, description="a body that stops arriving this long gets HTTP 408")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="a larger request line plus headers gets HTTP 431")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must complete within this "
                                                           "(else HTTP 408 and a close)")
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(2048, ge=1, description="open connections at most; past it HTTP 503 and a close")
    served_model_name: list[str] | None = Field(
        None, description="the model's names in the API (as vLLM's flag): the first is the id responses carry, "
                          "each is accepted as `model`; default: the preset's name or the directory's basename")

    @field_validator("served_model_name")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not n.strip() for n in v)):
            raise ValueError("give one or more non-empty names")
        return v

    def model_names(self) -> tuple[str, ...]:
        """The names `model` may be: the served names, else the model's short name, and the
        --model value as given (vLLM's default name is that path)."""
        if self.served_model_name:
            return tuple(dict.fromkeys(self.served_model_name))
        short = self.model if self.model in PRESETS else self.model.rstrip("/").split("/")[-1]
        return tuple(dict.fromkeys([short, self.model]))

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("FAPOOL_API_KEY") or None

    def http_limits(self) -> HttpLimits:
        from serve.http_limits import HttpLimits

        return HttpLimits(max_header_bytes=self.max_header_bytes, header_timeout_s=self.header_timeout_s,
                          keep_alive_s=self.keep_alive_s, max_connections=self.max_connections)

    def limits(self) -> ServeLimits:
        from serve.service import ServeLimits

        return ServeLimits(max_inflight=self.max_inflight, request_timeout_s=self.request_timeout_s,
                           max_body_bytes=self.max_body_bytes, stream_chunks_per_s=self.stream_chunks_per_s)


# ---- flags ------------------------------------------------------------------------------------
def add_flags(p: argparse.ArgumentParser | Any, model: type[BaseModel]) -> None:
    """One flag per field of `model`, with its type, default, bounds in the model, and help."""
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if f.annotation in (bool, bool | None):  # --foo / --no-foo (neither: None, the default)
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.description)
            continue
        if f.annotation in (list[str], list[str] | None):  # --foo A B C
            p.add_argument("--" + name.replace("_", "-"), nargs="+", default=f.default, help=f.description)
            continue
        p.add_argument("--" + name.replace("_", "-"), type=_scalar(f.annotation), default=f.default,
                       choices=extra.get("choices"), help=f.description)


def options_from(model: type[Options], args: argparse.Namespace) -> Options:
    """`model` built from the parsed flags; raises `ValueError` naming the first bad flag."""
    try:
        return model(**{k: getattr(args, k) for k in model.model_fields})
    except ValidationError as e:
        raise ValueError(flag_error(e)) from None


def flag_error(e: ValidationError) -> str:
    err = e.errors()[0]
    flag = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-")
    return f"{flag}: {err['msg'].removeprefix('Value error, ')}"


def _scalar(annotation: Any) -> type:
    """`int` for `int` and `int | None`: the type argparse converts a flag's text with."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation
