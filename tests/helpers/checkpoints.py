"""Tiny random Hugging Face checkpoints built offline with transformers, good ones and broken ones.

Weights are re-drawn with a large std (`INIT_STD`, default 0.5) instead of transformers' 0.02:
logits then spread over a few units, so greedy decoding picks clearly separated tokens and two
implementations agree on the argmax instead of flipping on rounding. Norm weights are 1 + noise and
biases are non-zero so a loader that swaps or skips them is caught.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 384
INIT_STD = 0.5
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "FA Pool serves language models with a pool of attention workers.",
    "Numbers 0123456789 and some unicode: café, naïve, 東京, 🙂.",
    "def main():\n    return 42\n",
] * 20

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYS] ' + message['content'] + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_bpe_tokenizer(special_tokens: list[str], bos: str | None, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE trained on `CORPUS`; specials get ids 0.., and `bos` (if any) is prepended on encode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        bos_id = special_tokens.index(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embedding: drawn once
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def _write_tokenizer(path: Path, tok: Tokenizer, config: dict) -> None:
    tok.save(str(path / "tokenizer.json"))
    # PreTrainedTokenizerFast makes transformers use tokenizer.json as is (a Llama class would rebuild it).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_llama_checkpoint(path: Path, *, gqa: bool = True, tie: bool = False, seed: int = 0,
                          num_layers: int = 2, std: float = INIT_STD, hidden: int = 64, dtype: str = "float32",
                          max_positions: int = 4096) -> Path:
    """LlamaForCausalLM (vocab 384, hidden 64, 4 heads, 2 KV heads with `gqa`) + a `<s>`/`</s>` BPE
    tokenizer. `hidden=512, dtype="bfloat16"`: heads of 128, what flash-attn-4 takes (the GPU tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
        dtype=dtype,
    )
    torch.manual_seed(seed)  # transformers' own init, overwritten below, still draws from the global RNG
    model = LlamaForCausalLM(cfg)
    _randomize(model, seed, std)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    tok = build_bpe_tokenizer(["<s>", "</s>"], bos="<s>")
    _write_tokenizer(path, tok, {
        "bos_token": "<s>", "eos_token": {
            "__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        },
        "add_bos_token": True, "chat_template": LLAMA_CHAT_TEMPLATE,
    })
    return path


def make_qwen2_checkpoint(path: Path, seed: int = 0, std: float = INIT_STD) -> Path:
    """Qwen2ForCausalLM (q/k/v biases) + a ChatML tokenizer with no bos.

    Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`. config.json's eos is 2 and
    generation_config.json lists [2, 0], as Qwen2 instruct checkpoints do, so the merge is exercised.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    _randomize(model, seed, std)
    model.generation_config.eos_token_id = [2, 0]
    model.save_pretrained(path, safe_serialization=True)
    tok = build_bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None)
    _write_tokenizer(path, tok, {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML_TEMPLATE,
    })
    return path


def make_sharded_checkpoint(path: Path, max_shard_size: str = "64KB", seed: int = 0) -> Path:
    """A Llama checkpoint re-saved as `model.safetensors.index.json` + several shards."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    make_llama_checkpoint(path, seed=seed)
    model = LlamaForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    assert (path / "model.safetensors.index.json").is_file()
    return path


class PickleTrap:
    """Unpickling this creates `marker`: proof that someone unpickled the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_pickle_only_checkpoint(path: Path, marker: Path, filename: str = "pytorch_model.bin") -> Path:
    """A Llama checkpoint whose safetensors are replaced by a pickle holding a `PickleTrap(marker)`."""
    path = Path(path)
    make_llama_checkpoint(path)
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            state[name] = f.get_tensor(name)
    (path / "model.safetensors").unlink()
    state["trap"] = PickleTrap(marker)
    torch.save(state, path / filename)
    return path


def make_missing_shard_checkpoint(path: Path) -> tuple[Path, Path]:
    """A sharded checkpoint with its second shard deleted; returns (directory, deleted shard)."""
    path = make_sharded_checkpoint(path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / sorted(set(weight_map.values()))[1]
    shard.unlink()
    return path, shard


def make_unknown_arch_checkpoint(path: Path, architecture: str = "GPT2LMHeadModel") -> Path:
    """A Llama checkpoint whose config.json claims another architecture."""
    path = make_llama_checkpoint(path)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [architecture]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def make_wrong_shape_checkpoint(path: Path, tensor: str = "model.layers.1.mlp.up_proj.weight") -> Path:
    """A Llama checkpoint whose `tensor` lost its last row."""
    path = make_llama_checkpoint(path)
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    state[tensor] = state[tensor][:-1].contiguous()
    save_file(state, str(file), metadata={"format": "pt"})
    return path
