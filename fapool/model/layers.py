"""Building blocks of a Llama-family decoder, numerically matched to Hugging Face transformers."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fapool.config import ModelConfig
from fapool.model.ops import EAGER, ElementwiseOps


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: ElementwiseOps = EAGER) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm), one kernel when compiled."""
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps)


Fused = tuple[torch.Tensor, "torch.Tensor | None"]  # (weight, bias) of several Linears stacked


def fuse_linears(*linears: nn.Linear) -> Fused:
    """One weight (and bias) with the rows of `linears` in order; each Linear's own parameters
    become views into it (no second copy in memory; loading by name still fills them)."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if bias is not None:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, cfg: ModelConfig, ops: ElementwiseOps = EAGER) -> None:
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.ops = ops
        self.fused: Fused | None = None  # set by `LlamaForCausalLM.fuse_projections` once loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.fused is not None, "call fuse_projections() after loading the weights"
        gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)
        return self.down_proj(self.ops.silu_mul(gate, up))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with linear or llama3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    kind = cfg.rope_scaling[0]
    if kind == "linear":
        return inv_freq / cfg.rope_scaling[1]
    assert kind == "llama3", kind
    factor, low, high, orig = cfg.rope_scaling[1:]
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Per-step cos and sin; the layers apply them (`ElementwiseOps.rotary`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset(self, device: torch.device) -> None:
        """Recompute the frequencies in float32 (after `to_empty` or a cast to a low precision)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, D) cos and sin for `positions` (N,), computed once per step for every layer."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)
