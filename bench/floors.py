"""The physical floor of a step: bytes over the measured copy rate (decode), FLOPs over the measured
matmul and attention rates (prefill), for a pool of `pool` members plus the base."""
from __future__ import annotations

from fapool.config import ModelConfig


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters a decode step reads besides the embedding table)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    layer = h * cfg.q_size + 2 * h * cfg.kv_size + cfg.q_size * h + 3 * h * i + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total = embed + L * layer + head + h
    return total, L * layer + cfg.vocab_size * h + h


def decode_floor_s(cfg: ModelConfig, context: int, batch: int, pool: int, dtype_bytes: int,
                   copy_bytes_per_s: float) -> float:
    """Weights once on the base plus every KV byte once, split over base + members, at the measured
    device-to-device copy rate (bytes read + written per second: what HBM sustains, about 3.0 TB/s
    on an H100, against a 3.35 TB/s datasheet peak)."""
    _, read_params = param_counts(cfg)
    weights = read_params * dtype_bytes
    kv = batch * context * cfg.kv_bytes_per_token(dtype_bytes)
    per_gpu = max(weights + kv / (pool + 1), kv / (pool + 1))
    return per_gpu / copy_bytes_per_s


def prefill_flops(cfg: ModelConfig, context: int) -> tuple[float, float]:
    """(linear FLOPs, causal attention FLOPs) of one prompt."""
    _, read_params = param_counts(cfg)
    linear = 2.0 * context * (read_params - cfg.vocab_size * cfg.hidden_size)  # LM head: last token only
    attention = 2.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context * context
    return linear, attention


def prefill_floor_s(cfg: ModelConfig, context: int, pool: int, matmul_flops_per_s: float,
                    attention_flops_per_s: float) -> float:
    linear, attention = prefill_flops(cfg, context)
    return linear / matmul_flops_per_s + attention / (pool + 1) / attention_flops_per_s
