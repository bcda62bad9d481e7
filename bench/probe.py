"""Measured machine rates that the floors are computed from (one GPU, or the CPU)."""
from __future__ import annotations

import time

import torch

from fapool.attention import select_kernel
from fapool.attention.triton_decode import triton_decode_reason
from fapool.loader import resolve_device


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def probe(device: str = "auto", dtype: str = "bfloat16") -> dict[str, float | str]:
    """Copy bandwidth (bytes read + written per second), matmul and causal attention FLOP/s."""
    dev = resolve_device(device)
    dt = getattr(torch, dtype) if dev.type == "cuda" else torch.float32
    big = dev.type == "cuda"
    n_copy = (1 << 30) if big else (1 << 24)  # elements
    src = torch.empty(n_copy, dtype=dt, device=dev)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), dev, 20 if big else 5)
    copy_bps = 2 * src.numel() * src.element_size() / t
    m = 8192 if big else 512
    a = torch.randn(m, m, dtype=dt, device=dev)
    b = torch.randn(m, m, dtype=dt, device=dev)
    t = _time(lambda: a @ b, dev, 20 if big else 3)
    mm = 2 * m**3 / t
    kernel = select_kernel(dev, "auto", dtype=dt)
    n, h, d = (16384, 32, 128) if big else (512, 4, 16)
    q = torch.randn(n, h, d, dtype=dt, device=dev)
    k, v = torch.randn_like(q), torch.randn_like(q)
    t = _time(lambda: kernel.forward(q, k, v, causal=True), dev, 10 if big else 2)
    attn = 2 * h * d * n * n / t  # causal: half of 4·n²·h·d
    # Decode: one query row per sequence over its region of a KV arena, as the engine runs it.
    b, ctx = (8, 65536) if big else (4, 1024)
    ka = torch.randn(b * ctx, h, d, dtype=dt, device=dev)
    va = torch.randn_like(ka)
    qd = torch.randn(b, h, d, dtype=dt, device=dev)
    starts, lengths = [i * ctx for i in range(b)], [ctx] * b
    plan = kernel.varlen_plan(starts, lengths, h, dev)
    t = _time(lambda: kernel.decode_varlen(qd, ka, va, starts, lengths, plan=plan), dev, 20 if big else 2)
    decode_bps = 2 * ka.numel() * ka.element_size() / t
    reason = triton_decode_reason(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "kernel": kernel.name, "copy_bytes_per_s": copy_bps, "matmul_flops_per_s": mm,
            "attention_flops_per_s": attn, "decode_kernel": "triton split-KV" if reason is None else kernel.name,
            "decode_bytes_per_s": decode_bps, "decode_shape": f"{b}x{ctx}"}
