"""Decode attention kernels side by side, in bytes of K and V read per second.

    python -m bench.decode_kernels            # on a CUDA machine; prints a table, writes JSON to --out

Each row is one query token per sequence over its region of a KV arena (the engine's layout):
the Triton split-KV kernel, the sdpa kernel without it (PyTorch's varlen flash op, or its per-
sequence flash op for few long sequences), and cuDNN on a dense (B, H, S, D) copy of the same
keys, which is not the engine's layout but shows what the memory system gives.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fapool.attention import select_kernel
from fapool.attention import triton_decode
from fapool.attention.sdpa_ops import cudnn_op

SHAPES = ((8, 65536), (1, 65536), (8, 16384), (32, 4096))


def _time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure(batch: int, ctx: int, heads: int = 32, kv_heads: int = 32, d: int = 128) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    gap = 512  # regions are not packed in the arena
    ka = torch.randn(batch * (ctx + gap), kv_heads, d, dtype=dt, device=dev)
    va = torch.randn_like(ka)
    q = torch.randn(batch, heads, d, dtype=dt, device=dev)
    starts, lengths = [i * (ctx + gap) for i in range(batch)], [ctx] * batch
    nbytes = 2 * batch * ctx * kv_heads * d * ka.element_size()
    kernel = select_kernel(dev, "sdpa", dtype=dt)
    os.environ[triton_decode.ENV_VAR] = "1"  # measured here whatever the default
    row = {"batch": batch, "context": ctx, "bytes": nbytes}
    plan = kernel.varlen_plan(starts, lengths, kv_heads, dev)
    t = _time(lambda: kernel.decode_varlen(q, ka, va, starts, lengths, plan=plan))
    row["triton_split_kv_s"] = t if isinstance(plan, triton_decode.SplitPlan) else None
    triton_decode.disable("measuring the fallback")
    try:
        plan = kernel.varlen_plan(starts, lengths, kv_heads, dev)
        row["sdpa_fallback_s"] = _time(lambda: kernel.decode_varlen(q, ka, va, starts, lengths, plan=plan))
    finally:
        triton_decode.reenable()
    kd = torch.stack([ka[s : s + ctx] for s in starts]).transpose(1, 2).contiguous()  # (B, H, S, D)
    vd = torch.stack([va[s : s + ctx] for s in starts]).transpose(1, 2).contiguous()
    row["cudnn_dense_s"] = _time(lambda: cudnn_op(q.unsqueeze(2), kd, vd, False, d**-0.5))
    for key in ("triton_split_kv_s", "sdpa_fallback_s", "cudnn_dense_s"):
        if row[key]:
            row[key[:-2] + "_tb_per_s"] = nbytes / row[key] / 1e12
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.decode_kernels needs a CUDA device")
    rows = [measure(b, n) for b, n in SHAPES]
    name = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) / f"decode-kernels-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"{'batch x context':>16} {'triton split-KV':>16} {'sdpa fallback':>14} {'cuDNN dense':>12}  (TB/s of K and V)")
    for r in rows:
        cells = [f"{r.get(k, 0) or 0:.2f}" for k in ("triton_split_kv_tb_per_s", "sdpa_fallback_tb_per_s",
                                                      "cudnn_dense_tb_per_s")]
        print(f"{r['batch']:>7} x {r['context']:<7} {cells[0]:>16} {cells[1]:>14} {cells[2]:>12}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
