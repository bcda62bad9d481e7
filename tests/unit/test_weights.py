"""Checkpoint loading: exact equality with transformers' weights, and every broken checkpoint refused."""
from __future__ import annotations

import json
import os
import pickle
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fapool.config import ModelConfig
from fapool.weights import find_weight_files, load_model_config, load_weights
from tests.helpers.checkpoints import (
    make_llama_checkpoint,
    make_missing_shard_checkpoint,
    make_pickle_only_checkpoint,
    make_qwen2_checkpoint,
    make_sharded_checkpoint,
    make_unknown_arch_checkpoint,
    make_wrong_shape_checkpoint,
)


# A stand-in for fapool.model.llama with Hugging Face's parameter names and shapes, and no forward.
class _Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, cfg.q_size, bias=b)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=b)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=b)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _Norm(cfg.hidden_size)
        self.post_attention_layernorm = _Norm(cfg.hidden_size)


class _Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = _Norm(cfg.hidden_size)


class HFNamedModel(nn.Module):
    def __init__(self, cfg: ModelConfig, share_embeddings: bool = False) -> None:
        super().__init__()
        self.model = _Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if share_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.no_grad():  # a sentinel, so a parameter the loader skips cannot pass by accident
            for p in self.parameters():
                p.fill_(-7.0)


def reference_state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = dict(hf.state_dict())
    state["lm_head.weight"] = hf.get_output_embeddings().weight.detach()  # present even when tied
    return state


def assert_loaded_exactly(model: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    names = dict(model.named_parameters(remove_duplicate=False))
    assert set(names) <= set(ref), set(names) - set(ref)
    for name, p in names.items():
        assert torch.equal(p.detach(), ref[name].to(p.dtype)), name


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_ref(llama_dir):
    return reference_state(llama_dir)


@pytest.mark.parametrize("gqa", [True, False])
def test_llama_loads_exactly_transformers_weights(tmp_path, gqa):
    path = make_llama_checkpoint(tmp_path, gqa=gqa, num_layers=3)
    cfg = load_model_config(path)
    assert cfg.num_key_value_heads == (2 if gqa else 4) and cfg.num_hidden_layers == 3
    model = HFNamedModel(cfg)
    load_weights(model, path, cfg)
    assert_loaded_exactly(model, reference_state(path))


def test_fixture_weights_are_wide_and_distinct(llama_ref):
    # The fixtures promise std ~0.5, norms near 1 and different layers, so a mixed-up load shows.
    q0, q1 = llama_ref["model.layers.0.self_attn.q_proj.weight"], llama_ref["model.layers.1.self_attn.q_proj.weight"]
    assert 0.4 < q0.std().item() < 0.6
    assert not torch.equal(q0, q1)
    norm = llama_ref["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm, llama_ref["model.layers.0.post_attention_layernorm.weight"])
    assert 0.5 < norm.mean().item() < 1.5


def test_qwen2_biases_load(tmp_path):
    path = make_qwen2_checkpoint(tmp_path)
    cfg = load_model_config(path)
    assert cfg.attention_bias
    model = HFNamedModel(cfg)
    load_weights(model, path, cfg)
    ref = reference_state(path)
    assert_loaded_exactly(model, ref)
    assert model.model.layers[1].self_attn.k_proj.bias.abs().sum() > 0
    assert model.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("share", [True, False])
def test_tied_lm_head_takes_the_embedding(tmp_path, share):
    path = make_llama_checkpoint(tmp_path, tie=True)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    cfg = load_model_config(path)
    assert cfg.tie_word_embeddings
    model = HFNamedModel(cfg, share_embeddings=share)
    load_weights(model, path, cfg)
    ref = reference_state(path)
    assert torch.equal(model.lm_head.weight, ref["model.embed_tokens.weight"])
    assert_loaded_exactly(model, ref)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == share


def test_untied_config_without_lm_head_is_missing(tmp_path):
    path = make_llama_checkpoint(tmp_path, tie=True)
    cfg = load_model_config(path).replace(tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"'lm_head\.weight'.*expected shape \(384, 64\)"):
        load_weights(HFNamedModel(cfg), path, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converts_to_parameter_dtype(llama_dir, llama_ref, dtype):
    cfg = load_model_config(llama_dir)
    model = HFNamedModel(cfg).to(dtype)
    load_weights(model, llama_dir, cfg)
    assert all(p.dtype == dtype for p in model.parameters())
    assert_loaded_exactly(model, llama_ref)


def test_sharded_checkpoint_loads(tmp_path):
    path = make_sharded_checkpoint(tmp_path)
    files = find_weight_files(path)
    assert len(files) >= 3 and all(f.name.startswith("model-0") for f in files)
    cfg = load_model_config(path)
    model = HFNamedModel(cfg)
    load_weights(model, path, cfg)
    assert_loaded_exactly(model, reference_state(path))


def test_any_safetensors_name_is_found_and_extra_tensors_are_ignored(tmp_path, llama_dir, llama_ref):
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    (path / "model.safetensors").unlink()
    save_file(state, str(path / "weights.safetensors"), metadata={"format": "pt"})
    assert find_weight_files(path) == [path / "weights.safetensors"]
    cfg = load_model_config(path)
    model = HFNamedModel(cfg)
    load_weights(model, path, cfg)
    assert_loaded_exactly(model, llama_ref)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_checkpoint_is_refused_unopened(tmp_path, monkeypatch, filename):
    marker = tmp_path / "unpickled.txt"
    path = make_pickle_only_checkpoint(tmp_path / "ckpt", marker, filename=filename)
    assert not marker.exists()

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    cfg = load_model_config(path)
    with pytest.raises(ValueError, match=rf"{filename}.*safetensors only.*safe_serialization=True"):
        load_weights(HFNamedModel(cfg), path, cfg)
    assert not marker.exists()
    monkeypatch.undo()
    torch.load(path / filename, weights_only=False)  # the trap is real: unpickling the file fires it
    assert marker.exists()


def test_missing_shard_is_named(tmp_path):
    path, shard = make_missing_shard_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=rf"{shard.name}.*missing"):
        find_weight_files(path)


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    path = make_wrong_shape_checkpoint(tmp_path, tensor="model.layers.1.mlp.up_proj.weight")
    cfg = load_model_config(path)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' in .*model\.safetensors "
                                         r"has shape \(127, 64\), but the model expects \(128, 64\)"):
        load_weights(HFNamedModel(cfg), path, cfg)


def test_parameter_missing_from_files(llama_dir):
    # A Llama checkpoint has no q/k/v biases; a model that wants them must be told which one is missing.
    cfg = load_model_config(llama_dir).replace(attention_bias=True)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' \(expected shape \(64,\)\)"
                                         r" is not in .*model\.safetensors"):
        load_weights(HFNamedModel(cfg), llama_dir, cfg)


def test_unknown_architecture_is_refused(tmp_path):
    path = make_unknown_arch_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported"):
        load_model_config(path)


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nope'}: no such model directory"):
        find_weight_files(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{tmp_path}: no weights found"):
        find_weight_files(tmp_path)


def test_meta_parameters_are_refused(llama_dir):
    cfg = load_model_config(llama_dir)
    with torch.device("meta"):
        model = HFNamedModel.__new__(HFNamedModel)
        nn.Module.__init__(model)
        model.model = _Decoder(cfg)
        model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        load_weights(model, llama_dir, cfg)


def test_generation_config_eos_ids_are_merged(tmp_path, llama_dir):
    qwen = make_qwen2_checkpoint(tmp_path / "qwen")
    assert load_model_config(qwen).eos_token_ids == (2, 0)  # config.json says 2, generation_config [2, 0]
    path = tmp_path / "llama"
    shutil.copytree(llama_dir, path)
    assert load_model_config(path).eos_token_ids == (1,)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_model_config(path).eos_token_ids == (1, 7)
    (path / "generation_config.json").unlink()
    assert load_model_config(path).eos_token_ids == (1,)


def test_model_config_reads_what_transformers_5_writes(tmp_path, llama_dir):
    # transformers 5 writes "dtype" (not torch_dtype) and nests rope_theta in "rope_parameters".
    raw = json.loads((llama_dir / "config.json").read_text())
    assert raw["dtype"] == "float32" and "rope_theta" in raw.get("rope_parameters", raw)
    cfg = load_model_config(llama_dir)
    assert (cfg.dtype, cfg.rope_theta, cfg.head_dim, cfg.rms_norm_eps) == ("float32", 10000.0, 16, 1e-5)
    qwen = load_model_config(make_qwen2_checkpoint(tmp_path))
    assert (qwen.rope_theta, qwen.attention_bias, qwen.bos_token_id) == (1000000.0, True, None)


def test_model_config_reads_rope_scaling_from_rope_parameters(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=384, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ).save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192)
