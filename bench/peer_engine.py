"""One engine's in-process points for `python -m bench.peer`, run in a process of its own:

    python -m bench.peer_engine --engine fapool --preset paper --json $OUT/fapool.json
    VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=/tmp/vllm python -m bench.peer_engine --engine vllm ...

Both engines are timed by the same functions (bench.engine's decode_point and ttft,
bench.engine_load's load): vLLM runs behind bench/peer_vllm.py's VllmEngine, which answers the
calls those functions make. The same settings for both: random weights of the preset's shape,
greedy, ignore_eos, token-id prompts (bench.engine_load.ids), prefix caching off, 64 sequences at
most, the same prompt-token budget a step, the same context limit. With --profile, afterwards
(never during the timed runs), the device's kernels at each point, by the torch profiler.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from bench.engine import POINTS, decode_point, ttft
from bench.engine_load import load
from bench.probe import probe
from fapool.config import PRESETS

TTFT_LENGTHS = {"cuda": (16384, 65536), "cpu": (256, 1024)}
LOAD = {"cuda": (64, 128, 1000, 128), "cpu": (8, 16, 100, 16)}  # in flight, requests, prompt, out
KINDS = [("gemm", r"gemm|nvjet|cutlass.*(tensorop|wgmma)|xmma|cublas|splitk|s16816|matmul"),
         ("attention", r"flash|fmha|attn|attention|paged|split_kv|combine"),
         ("norm", r"rms|norm"), ("rope", r"rope|rotary"),
         ("sampling", r"argmax|topk|top_k|sort|sampl|softmax|gumbel|exponential"),
         ("copy", r"memcpy|memset|copy|cat|index|scatter|gather|fill")]


def build(engine: str, preset: str, device: str, budget: int, max_len: int, work: Path):
    cfg = PRESETS[preset]
    if engine == "vllm":
        from bench.peer_vllm import VllmEngine

        return VllmEngine(cfg, work / f"vllm-{preset}", max_num_seqs=64, max_num_batched_tokens=budget,
                          max_model_len=max_len)
    from fapool import EngineConfig, LLMEngine

    ec = EngineConfig(model=preset, device=device, max_num_seqs=64, max_prefill_tokens=budget, max_model_len=max_len,
                      kv_capacity_tokens=600_000 if device == "cuda" else 20_000)
    if "prefix_caching" in EngineConfig.__dataclass_fields__:  # random prompts share nothing, but say so
        ec = ec.replace(prefix_caching=False)
    return LLMEngine(ec)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, rx in KINDS if re.search(rx, low)), "other")


def profile(fn, steps: int) -> dict | None:
    """The device's kernels while `fn` runs `steps` engine steps: per step, each kind's time, the
    busy total, and the wall; the top kernels. None off CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_kind: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + us
        top.append((us, e.key, e.count))
    top.sort(reverse=True)
    busy = sum(by_kind.values())
    return {"steps": steps, "wall_ms": 1e3 * wall / steps, "busy_ms": 1e-3 * busy / steps,
            "kinds_ms": {k: round(1e-3 * v / steps, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:90], "ms": round(1e-3 * us / steps, 4), "calls": round(c / steps, 2)}
                    for us, k, c in top[:12]]}


def run(args) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    points = POINTS[dev]
    max_len = 131072 if dev == "cuda" else 4096
    pr = probe(dev) if args.engine == "fapool" else None  # the copy rate the floors are computed from
    t0 = time.perf_counter()
    engine = build(args.engine, args.preset, dev, args.budget, max_len, Path(args.work))
    r = {"engine": args.engine, "preset": args.preset, "budget": args.budget, "max_model_len": max_len,
         "ready_s": time.perf_counter() - t0, "python": platform.python_version(), "torch": torch.__version__,
         "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "kernel": engine.kernel.name,
         "decode": [], "ttft": [], "load": None, "profile": {}, "probe": pr}
    if args.engine == "vllm":
        import vllm

        r["vllm"] = vllm.__version__
    print(f"{args.engine}: engine ready in {r['ready_s']:.1f} s", flush=True)
    for i, (ctx, b) in enumerate(points):
        then = (lambda: profile(lambda: [engine.step() for _ in range(8)], 8)) if args.profile else None
        p = decode_point(engine, ctx, b, args.steps, seed=100 * i, then=then)
        r["profile"][f"{ctx}x{b}"] = p.pop("then", None)
        r["decode"].append(p)
        print(args.engine, json.dumps(p), flush=True)
    lengths = TTFT_LENGTHS[dev]
    ttft(engine, lengths[0] + 7, 1)  # the first prefill of this size class, not timed
    for j, n in enumerate(lengths):
        times = [1e3 * ttft(engine, n, 11 + 10 * j + k) for k in range(args.ttft_reps)]
        r["ttft"].append({"tokens": n, "ms": times, "median_ms": statistics.median(times)})
        print(args.engine, json.dumps(r["ttft"][-1]), flush=True)
    c, reqs, n_in, n_out = LOAD[dev]
    load(engine, c, 8, n_in, n_out, seed=300)  # warm: the first wave's sizes
    r["load"] = load(engine, c, reqs, n_in, n_out, seed=400)
    print(args.engine, json.dumps(r["load"]), flush=True)
    if args.profile:  # after the timed runs
        r["profile"][f"ttft{lengths[0]}"] = profile(lambda: ttft(engine, lengths[0], 901), 1)
        r["profile"]["load"] = profile(lambda: load(engine, c, c, n_in, 32, seed=950), 1)
        print(args.engine, "profile", json.dumps(r["profile"]), flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["fapool", "vllm"], required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--budget", type=int, default=16384, help="prompt tokens a step (vLLM: max_num_batched_tokens)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--ttft-reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    r = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
