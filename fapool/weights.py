"""Read a Hugging Face checkpoint directory: config, EOS ids and safetensors weights.

Only safetensors are read. Pickle checkpoints (`*.bin`, `*.pt`, ...) can run arbitrary code when
loaded, so they are refused by file name and never opened.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fapool.config import ModelConfig

if TYPE_CHECKING:  # torch loads in seconds: checking a directory must not wait for it
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TIED_PAIR = ("lm_head.weight", "model.embed_tokens.weight")


def check_model_dir(model_dir: str | Path) -> None:
    """Raise `ValueError` (one line: the file and the fix) for a directory FA Pool cannot serve,
    before anything slow starts: no directory, pickle-only weights (checked first, and never
    opened), no weights, a missing or bad `config.json`, no `tokenizer.json`. Reads only file
    names and config.json, so the CLI can call it before it starts Ray."""
    model_dir = Path(model_dir)
    find_weight_files(model_dir)
    load_model_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir / 'tokenizer.json'}: missing; FA Pool needs a fast tokenizer "
                         "(save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir))")


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding `model_dir`'s weights, in load order.

    `model.safetensors` if present, else the shards named by `model.safetensors.index.json`, else
    every `*.safetensors`. Raises `ValueError` for a missing directory, a shard named in the index
    but absent, a directory with only pickle checkpoints, or one with no weights at all.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model directory; give a Hugging Face-format model directory")
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    index = model_dir / INDEX_FILE
    if index.is_file():
        return _shards_from_index(index)
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:  # named by file name only: opening a pickle can run code
        raise ValueError(
            f"{pickles[0]}: FA Pool loads safetensors only and will not unpickle pickle checkpoints "
            f"({', '.join(p.name for p in pickles)}); convert the model with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise ValueError(
        f"{model_dir}: no weights found (no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors); "
        "give a directory written by save_pretrained(..., safe_serialization=True)"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map' object") from None
    # dict.fromkeys keeps the index's order while dropping the repeats of each shard name.
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise ValueError(f"{shard}: shard listed in {index.name} is missing; re-download or re-save the checkpoint")
    if not shards:
        raise ValueError(f"{index}: weight_map is empty; re-save the checkpoint")
    return shards


def load_weights(model: torch.nn.Module, model_dir: Path, config: ModelConfig) -> None:
    """Copy every parameter of `model` from the safetensors files in `model_dir`.

    Parameter names must be Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...). Tensors
    are read one at a time and converted to each parameter's dtype and device. File tensors the
    model has no parameter for (e.g. `rotary_emb.inv_freq`) are skipped. With
    `config.tie_word_embeddings` and no `lm_head.weight` in the files, lm_head takes the embedding.
    Raises `ValueError` naming the tensor for a missing parameter or a shape mismatch.
    """
    import torch
    from safetensors import safe_open

    files = find_weight_files(model_dir)
    # remove_duplicate=False so a tied lm_head still shows up under its own name.
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, param in params.items():
        if param.is_meta:
            raise ValueError(f"parameter {name!r} is on the meta device; call model.to_empty(device=...) first")
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    param = params.get(name)
                    if param is None:
                        continue
                    found = tuple(f.get_slice(name).get_shape())
                    _check_shape(name, path, tuple(param.shape), found)
                    param.copy_(f.get_tensor(name).to(dtype=param.dtype))
                    loaded.add(name)
        _tie_lm_head(params, loaded, config, model_dir)
    missing = [name for name in params if name not in loaded]
    if missing:
        name = missing[0]
        raise ValueError(
            f"tensor {name!r} (expected shape {tuple(params[name].shape)}) is not in "
            f"{', '.join(str(p) for p in files)}; {len(missing)} parameter(s) missing in all "
            "- check that the checkpoint matches config.json's architecture and sizes"
        )


def _tie_lm_head(params: dict[str, torch.nn.Parameter], loaded: set[str], config: ModelConfig, model_dir: Path) -> None:
    head, embed = TIED_PAIR
    if not config.tie_word_embeddings or head not in params or head in loaded or embed not in loaded:
        return
    if params[head] is not params[embed]:
        _check_shape(head, model_dir / "(tied to embed_tokens)", tuple(params[head].shape), tuple(params[embed].shape))
        params[head].copy_(params[embed])
    loaded.add(head)


def _check_shape(name: str, path: Path, expected: tuple[int, ...], found: tuple[int, ...]) -> None:
    if expected != found:
        raise ValueError(
            f"tensor {name!r} in {path} has shape {found}, but the model expects {expected}; "
            "the checkpoint does not match its config.json"
        )


def load_model_config(model_dir: Path) -> ModelConfig:
    """`config.json` of `model_dir`, with the EOS ids of `generation_config.json` merged in.

    Chat models often list extra stop ids (e.g. an end-of-turn token) only in the generation config.
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_json(model_dir / "config.json")
    gen_path = model_dir / "generation_config.json"
    if not gen_path.is_file():
        return config
    try:
        gen = json.loads(gen_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{gen_path}: not valid JSON ({e}); fix or delete it") from None
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        return config
    extra = [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    return config.replace(eos_token_ids=merged)
