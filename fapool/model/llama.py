"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat batch of tokens.

Parameter names are Hugging Face's so checkpoints load by name. Attention itself is not computed
here: each layer hands its q, k, v to an `AttentionExecutor`, the seam where the engine keeps
attention local or sends it to the pool.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from fapool.config import ModelConfig
from fapool.model.layers import MLP, Fused, RMSNorm, Rotary, fuse_linears
from fapool.model.ops import EAGER, ElementwiseOps

if TYPE_CHECKING:
    from fapool.executor import AttentionExecutor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ops: ElementwiseOps = EAGER) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self.fused: Fused | None = None  # set by `LlamaForCausalLM.fuse_projections` once loaded

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]  # x: (N, hidden)
        assert self.fused is not None, "call fuse_projections() after loading the weights"
        q, k, v = F.linear(x, *self.fused).split(self.sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)  # (N, Hq, D)
        k = k.view(n, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary(q, k, cos, sin)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ops: ElementwiseOps = EAGER) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    # The residual stream travels between layers as (x, delta): the previous layer's MLP output
    # is added here, in the same kernel as this layer's norm (when compiled), not on its own.
    def pre_attention(
        self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything of the layer before attention: the stream (N, hidden) -> (stream, q, k, v)."""
        x, h = (x, self.input_layernorm(x)) if delta is None else self.input_layernorm.add_forward(x, delta)
        return (x, *self.self_attn.qkv(h, cos, sin))

    def post_attention(self, x: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after attention, given the stream x and attention output o (N, Hq, D):
        (stream, delta), the MLP's output `delta` not yet added."""
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn.o_proj(o.reshape(x.shape[0], -1)))
        return x, self.mlp(h)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        attn: AttentionExecutor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, q, k, v = self.pre_attention(x, delta, cos, sin)
        return self.post_attention(x, attn.attend(self.self_attn.layer_idx, q, k, v))


class Backbone(nn.Module):
    """Hugging Face's `model.*` submodule: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, ops: ElementwiseOps = EAGER) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ops) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.rotary = Rotary(cfg)

    def final_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The last layer's MLP output added to the stream, and the final norm."""
        return self.norm(x) if delta is None else self.norm.add_forward(x, delta)[1]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ElementwiseOps = EAGER) -> None:
        """`ops`: the elementwise chains, eager or compiled (`fapool.model.ops`)."""
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionExecutor
    ) -> torch.Tensor:
        """input_ids, positions: (N,) for all sequences of the step, concatenated. Returns (N, hidden)."""
        x, delta = self.model.embed_tokens(input_ids), None
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x, delta = layer(x, delta, cos, sin, attn)
        return self.model.final_norm(x, delta)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """After the weights are loaded: each layer's q, k, v projections become one matmul, as do
        the MLP's gate and up (fewer, larger GEMMs: a decode step reads the same bytes in fewer
        launches). The per-projection parameters become views into the fused weights, so their
        names, the state dict and the memory stay as they were."""
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.fused = fuse_linears(a.q_proj, a.k_proj, a.v_proj)
            m.fused = fuse_linears(m.gate_proj, m.up_proj)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, hidden) -> (M, vocab) float32."""
        return self.lm_head(hidden).float()

    def init_random(self, seed: int, std: float = 0.02) -> None:
        """Deterministic random weights (the `tiny` and `paper` presets have no checkpoint)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    # Generate on CPU in chunks so the same seed gives the same weights on any device.
                    p.copy_(torch.randn(p.shape, generator=gen).mul_(std).to(p.dtype))
