"""vLLM for `python -m bench.peer`: a model directory of the preset's shape, and vLLM's in-process
engine behind the few `LLMEngine` methods that bench.engine's and bench.engine_load's measurements
call, so that the same measuring code times both engines.

Runs in its own process with vLLM's own packages on the path (PYTHONPATH=/tmp/vllm and this
tree; not Ray's site, whose FastAPI differs) and VLLM_USE_FLASHINFER_SAMPLER=0.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from fapool.config import ModelConfig


def hf_config(cfg: ModelConfig) -> dict:
    """The preset's shape as a Hugging Face Llama config.json (vLLM's dummy loader reads only this)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(cfg.eos_token_ids), "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": cfg.dtype, "dtype": cfg.dtype}


def model_dir(cfg: ModelConfig, path: Path, tokenizer: bool, weights: bool = False) -> Path:
    """config.json; with `tokenizer` a word-level tokenizer.json over the whole vocabulary, each id
    one word, so that every token streams as text from both servers; with `weights` random
    safetensors weights of the shape (`fapool serve` loads them; vLLM draws its own, --load-format dummy)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    if weights:
        write_weights(cfg, path / "model.safetensors")
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        tok.save(str(path / "tokenizer.json"))
        eos = f"w{cfg.eos_token_ids[0]}"
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f"w{cfg.bos_token_id}", "eos_token": eos,
            "unk_token": "w0", "model_max_length": cfg.max_position_embeddings}))
    return path


def write_weights(cfg: ModelConfig, file: Path, seed: int = 0) -> None:
    """Random weights under Hugging Face Llama names (std 0.02, norms 1), made on the GPU if there is one."""
    import torch
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, cfg.dtype)
    g = torch.Generator(dev).manual_seed(seed)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size

    def rnd(*shape):
        return (0.02 * torch.randn(*shape, generator=g, device=dev)).to(dt).cpu()

    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=dt),
         "lm_head.weight": rnd(cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        w |= {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
              p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
              p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
              p + "mlp.down_proj.weight": rnd(h, i), p + "input_layernorm.weight": torch.ones(h, dtype=dt),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=dt)}
    save_file(w, str(file))


@dataclass
class _Seq:
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)


class VllmEngine:
    """vLLM's `LLMEngine` (engine core in this process) behind bench.engine's calls: add_request,
    step, abort, and each step's report, which is read off the step's outputs: a "decode" step gave
    every running sequence exactly one token, with no sequence still waiting for its first."""

    def __init__(self, cfg: ModelConfig, path: Path, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, gpu_memory_utilization: float = 0.9):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        from vllm import LLM

        self.llm = LLM(model=str(model_dir(cfg, path, tokenizer=False)), load_format="dummy",
                       skip_tokenizer_init=True, dtype=cfg.dtype, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                       enable_prefix_caching=False, gpu_memory_utilization=gpu_memory_utilization, seed=0)
        self.engine = self.llm.llm_engine
        self.loaded = SimpleNamespace(config=cfg)
        self.max_model_len = max_model_len
        self.live: dict[str, _Seq] = {}
        self.kernel = SimpleNamespace(name="vllm")
        self.graphs = None
        self._n = 0

    def add_request(self, _prompt, sp, prompt_token_ids: list[int]) -> str:
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        rid = f"r{self._n}"
        self._n += 1
        params = SamplingParams(max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=sp.ignore_eos,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)
        self.engine.add_request(rid, tokens_input(list(prompt_token_ids)), params)
        self.live[rid] = _Seq(len(prompt_token_ids))
        return rid

    def step(self) -> SimpleNamespace:
        """One engine step, or more until one brings outputs (with async scheduling a step can
        return none): its wall time is then counted with the step that brings them. Shaped as
        LLMEngine.step's result: `outputs`, and a `report` read off them (see the class)."""
        res = self.engine.step()
        while not res and self.engine.has_unfinished_requests():
            res = self.engine.step()
        outs = []
        for o in res:
            new = tuple(o.outputs[0].token_ids)
            seq = self.live.get(o.request_id)
            if seq is not None:
                seq.output_ids += new
            if o.finished:
                self.live.pop(o.request_id, None)
            outs.append(SimpleNamespace(request_id=o.request_id, new_token_ids=new, finished=o.finished))
        got = {o.request_id: len(o.new_token_ids) for o in outs}
        decode = (bool(self.live) and all(got.get(r) == 1 for r in self.live) and all(n == 1 for n in got.values()))
        slices = [SimpleNamespace(end=s.prompt_tokens + len(s.output_ids)) for r, s in self.live.items() if r in got]
        report = SimpleNamespace(kind="decode" if decode else "other", num_seqs=len(slices), launch_s=float("nan"),
                                 batch=SimpleNamespace(slices=slices), num_tokens=sum(got.values()))
        return SimpleNamespace(outputs=outs, report=report)

    def abort(self, rid: str) -> None:
        self.engine.abort_request([rid])
        self.live.pop(rid, None)
