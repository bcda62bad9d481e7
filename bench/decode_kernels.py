"""Decode attention kernels side by side over a paged KV cache, in bytes of K and V read per second.

    python -m bench.decode_kernels            # on a CUDA machine; prints a table, writes JSON to --out

Each row is one query token per sequence over its pages, scattered through a page pool (the
engine's layout): every available kernel's `decode_paged` (flash-attn-4 reads the pages in one
launch; the others gather the rows into a contiguous copy first), the captured path's KV splits
merged by LSE, and cuDNN on a dense (B, H, S, D) copy of the same keys, which is not the
engine's layout but shows what the memory system gives.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fapool.attention import available_kernels, select_kernel
from fapool.attention.paged import PagedPlan, merge_splits, split_table
from fapool.attention.sdpa_ops import cudnn_op
from fapool.step_graph import splits_for

SHAPES = ((8, 65536), (1, 65536), (1, 16384), (64, 1024), (64, 4096))
PAGE = 128


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
    per = ctx // PAGE
    pool = batch * per + 1
    kp = torch.randn(pool, PAGE, kv_heads, d, dtype=dt, device=dev)
    vp = torch.randn_like(kp)
    order = np.random.default_rng(0).permutation(np.arange(1, pool)).astype(np.int32)
    table = order.reshape(batch, per)  # scattered pages
    q = torch.randn(batch, heads, d, dtype=dt, device=dev)
    nbytes = 2 * batch * ctx * kv_heads * d * kp.element_size()
    plan = PagedPlan.build(table, [ctx] * batch, [1] * batch, PAGE, dev)
    row = {"batch": batch, "context": ctx, "bytes": nbytes, "page": PAGE}
    splits = splits_for(batch, kv_heads, torch.cuda.get_device_properties(dev).multi_processor_count)
    for name in available_kernels(dev):
        if name == "reference":
            continue
        kernel = select_kernel(dev, name, dtype=dt)
        row[f"{name}_s"] = _time(lambda: kernel.decode_paged(q, kp, vp, plan))
        if kernel.paged_in_graph and splits > 1:  # as the captured step splits this batch
            chunks, rows = split_table(table, [ctx] * batch, PAGE, splits)
            cplan = PagedPlan.build(chunks, rows.tolist(), [1] * len(rows), PAGE, dev)
            qs = q.repeat_interleave(splits, 0)

            def split_decode() -> None:
                o, lse = kernel.paged_decode(qs, kp, vp, cplan.page_table, cplan.seq_lens)
                merge_splits(o, lse, cplan.seq_lens, splits)

            row[f"{name}_split{splits}_s"] = _time(split_decode)
    idx = torch.from_numpy(table.astype(np.int64)).to(dev)
    kd = kp[idx].flatten(1, 2).transpose(1, 2).contiguous()  # (B, H, S, D)
    vd = vp[idx].flatten(1, 2).transpose(1, 2).contiguous()
    row["cudnn_dense_s"] = _time(lambda: cudnn_op(q.unsqueeze(2), kd, vd, False, d**-0.5))
    for key in [k for k in row if k.endswith("_s")]:
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
    for r in rows:
        cells = ", ".join(f"{k[:-9]} {v:.2f}" for k, v in r.items() if k.endswith("_tb_per_s"))
        print(f"{r['batch']:>3} x {r['context']:<6} TB/s of K and V: {cells}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
