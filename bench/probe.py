"""Measured machine rates that the floors are computed from (one GPU, or the CPU)."""
from __future__ import annotations

import time

import numpy as np
import torch

from fapool.attention import select_kernel
from fapool.attention.paged import PagedPlan
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
    # Decode: one query row per sequence over its pages of a KV cache, as the engine runs it.
    b, ctx, page = (8, 65536, 128) if big else (4, 1024, 16)
    kp = torch.randn(b * ctx // page, page, h, d, dtype=dt, device=dev)
    vp = torch.randn_like(kp)
    qd = torch.randn(b, h, d, dtype=dt, device=dev)
    table = np.arange(b * ctx // page, dtype=np.int32).reshape(b, -1)
    plan = PagedPlan.build(table, [ctx] * b, [1] * b, page, dev)
    t = _time(lambda: kernel.decode_paged(qd, kp, vp, plan), dev, 20 if big else 2)
    decode_bps = 2 * kp.numel() * kp.element_size() / t
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "kernel": kernel.name, "copy_bytes_per_s": copy_bps, "matmul_flops_per_s": mm,
            "attention_flops_per_s": attn, "decode_kernel": kernel.name,
            "decode_bytes_per_s": decode_bps, "decode_shape": f"{b}x{ctx}"}
