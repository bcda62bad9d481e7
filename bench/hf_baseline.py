"""Hugging Face `transformers` on one device with the same shape: the baseline the paper-era
systems are compared with (eager PyTorch with SDPA attention)."""
from __future__ import annotations

import time

import torch

from fapool.config import PRESETS
from fapool.loader import resolve_device


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hf_baseline(preset: str, contexts: list[int], decode_contexts: list[int], decode_steps: int,
                device: str = "auto") -> dict:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = PRESETS[preset]
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the device itself: seconds, not minutes
        model = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {"prefill": [], "decode": [], "transformers": transformers.__version__}
    for n in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(dev)
        with torch.no_grad():
            model(ids, logits_to_keep=1)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            _sync(dev)
        out["prefill"].append({"context": n, "batch": 1, "ttft_s": time.perf_counter() - t0})
    for n in decode_contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(dev)
        times = {}
        for steps in (1, 1 + decode_steps):
            with torch.no_grad():
                _sync(dev)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
                _sync(dev)
            times[steps] = time.perf_counter() - t0
        tpot = (times[1 + decode_steps] - times[1]) / decode_steps
        out["decode"].append({"context": n, "batch": 1, "tpot_s": tpot})
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out
