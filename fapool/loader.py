"""Build a ready model from a preset name or a Hugging Face-format directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fapool.config import PRESETS, ModelConfig
from fapool.model import LlamaForCausalLM
from fapool.model.ops import EAGER, compiled_ops
from fapool.tokenizer import Tokenizer, load_tokenizer
from fapool.weights import check_model_dir, load_model_config, load_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    compiled: bool  # the elementwise chains run through torch.compile


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use --device cpu or auto")
    return device


def resolve_dtype(name: str | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    # CPUs run bf16/fp16 matmuls slowly and less exactly: float32 unless asked otherwise.
    if name is None:
        name = cfg.dtype if device.type == "cuda" else "float32"
    return DTYPES[name]


def load_model(source: str, device: str = "auto", dtype: str | None = None, seed: int = 0,
               torch_compile: bool | None = None) -> LoadedModel:
    """`source` is "tiny", "paper" or a directory with config.json, *.safetensors, tokenizer.json.
    `torch_compile` fuses the layers' elementwise chains (`fapool.model.ops`); None: on CUDA only."""
    dev = resolve_device(device)
    if torch_compile is None:
        torch_compile = dev.type == "cuda"
    if source in PRESETS:
        cfg = PRESETS[source]
    else:
        path = Path(source)
        if not path.is_dir():
            raise ValueError(
                f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor a directory; "
                "give a Hugging Face-format model directory"
            )
        check_model_dir(path)  # pickles are refused before config.json is even read
        cfg = load_model_config(path)
    torch_dtype = resolve_dtype(dtype, cfg, dev)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, compiled_ops() if torch_compile else EAGER)
    model = model.to_empty(device=dev).to(torch_dtype)
    model.model.rotary.reset(dev)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if source in PRESETS:
        model.init_random(seed)
    else:
        load_weights(model, Path(source), cfg)
    model.fuse_projections()
    model.eval()
    return LoadedModel(cfg, model, load_tokenizer(source, cfg), dev, torch_dtype, torch_compile)

