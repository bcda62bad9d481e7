"""Model and engine configuration: frozen dataclasses, read from Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow Hugging Face's `config.json`."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos).
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases (not on o_proj)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"use a checkpoint of one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix config.json"
            )
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token costs across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or [MODEL_TYPES.get(cfg.get("model_type"), cfg.get("model_type", "?"))]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {arch!r} is not supported; "
                f"FA Pool loads {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r} needed for {arch}") from None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(cfg)),
            rope_scaling=_rope_scaling(cfg.get("rope_scaling") or cfg.get("rope_parameters"), source),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype if dtype in SUPPORTED_DTYPES else "bfloat16",
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no config.json; a model directory needs a Hugging Face config.json")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(cfg, source=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters.
    params = cfg.get("rope_parameters") or {}
    return cfg.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(rs: dict[str, Any] | None, source: str) -> tuple | None:
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(rs["factor"]))
    if kind == "llama3":
        return (
            "llama3",
            float(rs["factor"]),
            float(rs["low_freq_factor"]),
            float(rs["high_freq_factor"]),
            int(rs["original_max_position_embeddings"]),
        )
    raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; use default, linear or llama3")


# Built-in presets that need no files.
TINY = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=384,  # 256 bytes + specials, see fapool.tokenizer.ByteTokenizer
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_ids=(257,),
    dtype="float32",
)

# The paper's shape: 4 layers, hidden 4096, 32 heads, FFN 16384 (about 1.3 B parameters, not 13 B).
PAPER = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=16384,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=262144,
    bos_token_id=256,  # the byte tokenizer's ids, as for tiny
    eos_token_ids=(257,),
    dtype="bfloat16",
)

# What users actually serve: Llama-3.1-8B's shape (32 layers, GQA 32/8, 128K vocabulary), random
# weights. Eight times the paper model's layers, so per-layer host costs show eight times over.
LLAMA8B = PAPER.replace(vocab_size=128256, intermediate_size=14336, num_hidden_layers=32, num_key_value_heads=8,
                        max_position_embeddings=131072)

PRESETS = {"tiny": TINY, "paper": PAPER, "llama8b": LLAMA8B}


ATTENTION_KERNELS = ("auto", "reference", "sdpa", "flash4", "flash2")  # fapool.attention.KERNELS, and auto


@dataclass(frozen=True)
class EngineConfig:
    """What one engine (one base GPU) runs and how much it admits at once."""

    model: str = "tiny"  # "tiny", "paper", or a Hugging Face-format directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # None: the checkpoint's dtype on CUDA, float32 on CPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_capacity_tokens: int | None = None  # None: from free device memory (a fixed default on CPU)
    max_num_seqs: int = 64  # running sequences at most
    # Prompt tokens per step beside the decodes (chunked prefill): a long prompt is prefilled a
    # chunk a step, so running streams wait at most one chunk's time for their next token.
    max_prefill_tokens: int = 2048
    page_size: int | None = None  # KV rows per page; None: 128 on CUDA (flash-attn-4's tile), 16 on CPU
    attention_kernel: str = "auto"  # one of ATTENTION_KERNELS (`--attention-kernel`); fapool/attention/kernels.py
    async_scheduling: bool = True  # launch a captured decode step before reading the previous one's tokens
    cuda_graphs: bool = True  # replay decode steps' non-attention work as CUDA graphs (CUDA only)
    # Fuse each layer's elementwise chains with torch.compile (fapool/model/ops.py). None: on CUDA,
    # where the paper model's decode step at 16K x 1 goes from 1.43 to 1.05 ms on an H200
    # (bench.engine); off on CPU, where compiling costs more than launches do.
    torch_compile: bool | None = None
    seed: int = 0  # weights of the random presets
    # Automatic prefix caching (fapool/prefix_cache.py): a prompt starts after the longest prefix
    # whose full KV pages the cache holds (`--no-prefix-caching` turns it off).
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {SUPPORTED_DTYPES}")
        for name in ("max_num_seqs", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; use a positive integer")

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
