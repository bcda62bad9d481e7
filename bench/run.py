"""`python -m bench.run`: FA Pool with pool sizes side by side, transformers, and the floor.

    python -m bench.run --preset tiny --device cpu                        # here, in a minute
    python -m bench.run --preset paper --pools 0,1,3 --out bench/results  # a 4-GPU machine
    ray job submit --working-dir . -- python -m bench.run --preset tiny   # against a cluster

One cluster serves every pool size in turn (the policy is switched between scenarios), so every
ratio compares runs of the same process on the same machine. Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import ray
import torch

from actors.cluster import Cluster, connect
from actors.config import ClusterConfig
from bench.floors import decode_floor_s, param_counts, prefill_floor_s
from bench.scenarios import Bench, wait_until
from fapool.config import PRESETS, EngineConfig
from fapool.policy import PolicyConfig, PoolCurve

DEFAULTS = {
    "tiny": {"contexts": "256,1024,4096", "batches": "1,8", "decode_contexts": "1024", "steps": 16},
    "paper": {"contexts": "4096,16384,32768,65536", "batches": "1,8", "decode_contexts": "16384,65536", "steps": 32},
    "llama8b": {"contexts": "4096,16384,32768", "batches": "1,8", "decode_contexts": "16384", "steps": 16},
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny (CPU, in a minute), paper (the paper's 1.3 B shape) or llama8b (Llama-3.1-8B's shape)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pools", default="0,1,3", help="pool sizes to compare, ascending from 0")
    p.add_argument("--contexts", default=None, help="prefill and decode contexts (tokens)")
    p.add_argument("--batches", default=None, help="decode batch sizes")
    p.add_argument("--steps", type=int, default=None, help="decode steps per point")
    p.add_argument("--oversized", type=int, default=-1, help="batch of the too-big-for-one-GPU point (-1: auto)")
    p.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV cache per actor (default: from GPU memory; on CPU the largest decode batch, at "
                        "least four, of the longest sequences)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-scaleup", action="store_true")
    p.add_argument("--out", default=os.environ.get("FAPOOL_BENCH_OUT", "bench/results"))
    p.add_argument("--name", default=None, help="result file name (default: preset and card)")
    p.add_argument("--address", default=None)
    args = p.parse_args(argv)
    d = DEFAULTS[args.preset]
    contexts = ints(args.contexts or d["contexts"])
    batches = ints(args.batches or d["batches"])
    steps = args.steps or d["steps"]
    pools = ints(args.pools)
    cfg = PRESETS[args.preset]

    # No runtime_env here: inside `ray job submit` Ray refuses a driver's runtime_env that repeats
    # the job's (env_vars included); a local cluster inherits this process's environment.
    connect(args.address)
    on_gpu = args.device == "cuda" or (args.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    gpu_opts = {"num_gpus": 1} if on_gpu else {}
    switches = {k: v for k, v in os.environ.items() if k.startswith("FAPOOL_")}  # as the cluster's actors get them
    probe = ray.get(ray.remote(_probe).options(num_cpus=0, **gpu_opts,
                                               **({"runtime_env": {"env_vars": switches}} if switches else {}))
                    .remote(args.device))
    print(f"probe: {probe}", flush=True)
    result: dict = {
        "preset": args.preset, "card": probe["device"], "num_gpus": ray.cluster_resources().get("GPU", 0),
        "kernel": probe["kernel"], "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "ray": ray.__version__,
        "python": platform.python_version(), "probe": probe, "code": _code_version(),
        "model": {"params": param_counts(cfg)[0], "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "ffn": cfg.intermediate_size,
                  "kv_bytes_per_token": cfg.kv_bytes_per_token(2 if on_gpu else 4)},
        "prefill": [], "decode": [], "oversized": [], "scaleup": [], "hf": None,
    }
    if not args.no_hf:
        hf_ctx = [n for n in contexts if n <= 65536]
        result["hf"] = ray.get(ray.remote(_hf).options(num_cpus=0, **gpu_opts).remote(
            args.preset, hf_ctx, [n for n in ints(d["decode_contexts"]) if n in hf_ctx] or hf_ctx[:1],
            min(steps, 16), args.device))
        print(f"transformers: {result['hf']}", flush=True)

    # On CPU: room for the largest decode batch at the longest context, with the slack that
    # Bench.decode gives its sequences to decode together (a chunk a step, then 256 more).
    chunks = -(-max(contexts) // EngineConfig().max_prefill_tokens)
    longest = max(contexts) + steps + 1 + 256 + max(batches) * (chunks + 2)
    kv = args.kv_capacity_tokens or (None if on_gpu else max(4, max(batches)) * longest)
    ccfg = ClusterConfig(engine=EngineConfig(model=args.preset, device=args.device, kv_capacity_tokens=kv),
                         policy=PolicyConfig(PoolCurve(((1, 0),)), 0, 0.0), profile=True,
                         member_kv_capacity_tokens=kv, pool_wait_s=600.0, data_plane_timeout_s=600.0,
                         # On CPU every pool size asked for, however few the cores (slower, not refused).
                         max_cpu_members=None if on_gpu else max(pools))
    name = args.name or f"{args.preset}-{probe['device'].replace(' ', '_')}-{int(result['num_gpus'])}gpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase, so a run cut short still leaves its numbers
        _summarise(result, quiet=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))

    save()
    with Cluster.start(ccfg) as cluster:
        bench = Bench(cluster, cfg, prefill_budget=ccfg.engine.max_prefill_tokens)
        dtype_bytes = 2 if on_gpu else 4
        for pool in pools:
            bench.set_pool(pool)
            if pool:
                # Grow the pool with a first request; from 0 that is the scale-up without standby.
                t0 = time.time()
                bench.run([bench.prompt(contexts[0])], 1)
                first = next(s for s in bench.steps() if s.num_pooled > 0)
                if not result["scaleup"] and not args.no_scaleup:
                    result["scaleup"].append({"members": pool, "standby": 0, "seconds": first.time_s - t0})
            bench.wait_size(pool)
            bench.run([bench.prompt(min(contexts))], 2)  # warm kernels for this pool size
            for n in contexts:
                r = bench.prefill(pool, n)
                r["floor_s"] = prefill_floor_s(cfg, n, pool, probe["matmul_flops_per_s"], probe["attention_flops_per_s"])
                result["prefill"].append(r)
                _print("prefill", r)
            for n in contexts:
                for b in batches:
                    r = bench.decode(pool, n, b, steps)
                    r["floor_s"] = decode_floor_s(cfg, n, b, pool, dtype_bytes, probe["copy_bytes_per_s"])
                    result["decode"].append(r)
                    _print("decode", r)
            if args.oversized != 0:
                n = max(contexts)
                big = args.oversized if args.oversized > 0 else _oversized_batch(cluster, n, steps)
                r = bench.oversized(pool, n, big, steps)
                result["oversized"].append(r)
                _print("oversized", r)
            save()
        if not args.no_scaleup and max(pools) > 0:
            size = max(pools)
            bench.set_pool(0, standby=size, cooldown_s=0.0)  # drained members become the standby
            bench.wait_size(0)
            wait_until(lambda: cluster.status().standby >= size, "a warm standby")
            r = bench.scaleup(size, contexts[0], standby=size)
            result["scaleup"].append(r)
            _print("scaleup", r)
    save()
    _summarise(result)
    print(f"wrote {out / (name + '.json')}")
    return 0


def _code_version() -> str | None:
    """The commit the harness runs (None where the tree travelled without .git)."""
    try:
        import subprocess

        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return None


def _probe(device: str) -> dict:
    from bench.probe import probe

    return probe(device)


def _hf(preset, contexts, decode_contexts, steps, device) -> dict:
    from bench.hf_baseline import hf_baseline

    return hf_baseline(preset, contexts, decode_contexts, steps, device)


def _oversized_batch(cluster: Cluster, n: int, steps: int) -> int:
    """A batch whose KV does not fit one base's cache: a few more sequences than fit."""
    cap = ray.get(cluster.bases[0].stats.remote()).kv_capacity_tokens
    return cap // (n + steps) + 4


def _print(kind: str, r: dict) -> None:
    keys = [k for k in ("pool", "context", "batch", "ttft_s", "tpot_s", "floor_s", "tps", "wall_s",
                        "max_concurrent", "decode_tps", "members", "standby", "seconds") if k in r]
    print(kind, " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys), flush=True)


def _summarise(result: dict, quiet: bool = False) -> None:
    """Ratios against pool 0 of the same run, printed last as a short table."""
    base_pre = {r["context"]: r["ttft_s"] for r in result["prefill"] if r["pool"] == 0}
    base_dec = {(r["context"], r["batch"]): r["tpot_s"] for r in result["decode"] if r["pool"] == 0}
    for r in result["prefill"]:
        if r["context"] in base_pre:
            r["speedup_vs_pool0"] = base_pre[r["context"]] / r["ttft_s"]
    for r in result["decode"]:
        key = (r["context"], r["batch"])
        if key in base_dec:
            r["speedup_vs_pool0"] = base_dec[key] / r["tpot_s"]
        ph = r.get("phases") or {}
        comm = ph.get("pool_wait", 0.0) - max(0.0, (r.get("member_attention_s") or 0.0) - ph.get("attention", 0.0))
        r["comm_sync_s"] = max(comm, 0.0)
        r["comm_sync_fraction"] = r["comm_sync_s"] / r["tpot_s"]
    if quiet:
        return
    print("\n| kind | pool | context | batch | time (ms) | floor (ms) | vs pool 0 |")
    print("|---|---|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| TTFT | {r['pool']} | {r['context']} | 1 | {r['ttft_s']*1e3:.2f} | {r['floor_s']*1e3:.2f} "
              f"| {r.get('speedup_vs_pool0', 0):.2f}x |")
    for r in result["decode"]:
        print(f"| TPOT | {r['pool']} | {r['context']} | {r['batch']} | {r['tpot_s']*1e3:.2f} | "
              f"{r['floor_s']*1e3:.2f} | {r.get('speedup_vs_pool0', 0):.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
