"""`python -m bench.engine`: one base engine (pool 0) on one GPU against the physical floor.

    python -m bench.engine --preset paper --out $OUT     # on a GPU machine, about 3 minutes
    python -m bench.engine --preset tiny --device cpu    # here, a smoke run

No Ray: this is the engine that a base actor runs, measured in-process so that every figure is
the engine's own. Side by side in one process:

- decode TPOT at 16K x 1, 64K x 8, 1K x 64 and 4K x 64 with the whole step in one CUDA graph
  ("graph"), the same with each layer's elementwise chains fused by torch.compile ("compiled"),
  and with the same paged kernel launched eagerly ("eager"), against the floor:
  (weights read by a step + every KV byte) / the measured copy bandwidth;
- TTFT of a prompt of a length never seen before against the same length repeated;
- the stall test: streams decoding while a long prompt arrives, the longest gap between two
  tokens of a stream, and the long prompt's TTFT against its TTFT alone.

Prints a table last; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.docs import put_section
from bench.engine_load import ids, load, load_lines
from bench.floors import decode_floor_s
from bench.probe import probe
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.config import PRESETS
from fapool.graphs import SEGMENT_BUCKETS

POINTS = {"cuda": [(16384, 1), (65536, 8), (1024, 64), (4096, 64)], "cpu": [(256, 1), (512, 4), (128, 16)]}


def decode_point(engine: LLMEngine, context: int, batch: int, steps: int, seed: int, then=None) -> dict:
    """TPOT at `context` x `batch`; `then()`, if given, runs after the timed steps while the batch
    still decodes (bench.peer profiles there) and its result is kept under "then"."""
    vocab = engine.loaded.config.vocab_size
    # Long enough that no stream ends while later ones are still prefilled (chunked prefill lets
    # the first sequences decode meanwhile).
    sp = SamplingParams(max_tokens=engine.max_model_len - context, temperature=0.0, ignore_eos=True)
    rids = [engine.add_request(None, sp, prompt_token_ids=ids(context, seed + i, vocab)) for i in range(batch)]
    until_tokens(engine, rids, 1)  # chunked prefill until every sequence has its first token
    for _ in range(2):
        engine.step()
    times, launch, kv = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        r = engine.step().report
        times.append(time.perf_counter() - t0)
        launch.append(r.launch_s)
        assert r.kind == "decode" and r.num_seqs == batch
        kv.append(statistics.mean(s.end for s in r.batch.slices))
    if os.environ.get("FAPOOL_BENCH_PROFILE"):
        profiled(lambda: [engine.step() for _ in range(4)], f"{context}x{batch}, 4 steps", kernels=True)
    extra = then() if then is not None else None
    for r in rids:
        engine.abort(r)
    # The floor counts the KV rows the steps really read (the prompt plus the tokens decoded so far).
    return {"context": context, "batch": batch, "kv_rows": round(statistics.mean(kv)),
            "tpot_ms": 1e3 * statistics.median(times), "tpot_p90_ms": 1e3 * sorted(times)[int(0.9 * len(times))],
            "host_launch_ms": 1e3 * statistics.median(launch), **({"then": extra} if then is not None else {})}


def ttft(engine: LLMEngine, n: int, seed: int) -> float:
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rid = engine.add_request(None, sp, prompt_token_ids=ids(n, seed, engine.loaded.config.vocab_size))
    t0 = time.perf_counter()
    while not any(o.finished for o in engine.step().outputs if o.request_id == rid):
        pass
    return time.perf_counter() - t0


def until_tokens(engine: LLMEngine, rids: list[str], n: int) -> None:
    """Step until each of `rids` has `n` tokens."""
    got = dict.fromkeys(rids, 0)
    while min(got.values()) < n:
        for o in engine.step().outputs:
            if o.request_id in got:
                got[o.request_id] += len(o.new_token_ids)


def profiled(fn, what: str, kernels: bool = False):
    """`fn()`, under the profiler with FAPOOL_BENCH_PROFILE set: host and device ops by host time,
    or with `kernels` the device's kernels alone by their time (a captured step's, too)."""
    if not os.environ.get("FAPOOL_BENCH_PROFILE"):
        return fn()
    from torch.profiler import ProfilerActivity, profile

    if kernels:
        activities = [ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]
    else:
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        out = fn()
    print(f"--- {what} ---")
    print(prof.key_averages().table(sort_by="cuda_time_total" if kernels else "cpu_time_total",
                                    row_limit=14 if kernels else 20, max_name_column_width=70))
    return out


def stall(engine: LLMEngine, streams: int, stream_ctx: int, long_ctx: int, seed: int) -> dict:
    vocab = engine.loaded.config.vocab_size
    alone = ttft(engine, long_ctx, seed + 99)
    sp = SamplingParams(max_tokens=engine.max_model_len - stream_ctx, temperature=0.0, ignore_eos=True)
    rids = [engine.add_request(None, sp, prompt_token_ids=ids(stream_ctx, seed + i, vocab)) for i in range(streams)]
    until_tokens(engine, rids, 3)
    long_id = engine.add_request(None, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                 prompt_token_ids=ids(long_ctx, seed + 99, vocab))
    t0 = last = time.perf_counter()
    worst = 0.0
    done = False
    while not done:
        outs = engine.step().outputs
        done = any(o.finished for o in outs if o.request_id == long_id)
        now = time.perf_counter()
        if {o.request_id for o in outs if o.new_token_ids} >= set(rids):
            worst, last = max(worst, now - last), now
    with_streams = time.perf_counter() - t0
    for r in rids:
        engine.abort(r)
    return {"streams": streams, "stream_context": stream_ctx, "long_context": long_ctx,
            "max_gap_ms": 1e3 * worst, "long_ttft_alone_ms": 1e3 * alone, "long_ttft_with_streams_ms": 1e3 * with_streams}


def markers(path: Path) -> tuple[str, str]:
    return f"<!-- bench.engine {path.stem} start -->", f"<!-- bench.engine {path.stem} end -->"


def markdown(path: Path) -> str:
    """The engine section of docs/benchmarks.md from one result file."""
    r = json.loads(path.read_text())
    pr = r["probe"]
    start, end = markers(path)
    lines = [start, f"## Single-GPU engine (pool 0): `{path.name}`", "",
             f"- card: **{r['device']}** x 1; paged kernel `{pr['kernel']}`; torch {r['torch']}, python {r['python']}",
             f"- probe: copy {pr['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {pr['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
             f"- command: `{r.get('command', 'python -m bench.engine')}`; date {r.get('date', '?')}; code {r['commit']}",
             "- floor: (weights a step reads + every KV row the steps read, prompt and tokens so far) / the "
             "measured copy rate. `graph`: the whole decode step in one CUDA graph, elementwise ops eager; "
             "`compiled`: the same with the elementwise chains fused by torch.compile (the default on CUDA); "
             "`eager`: the same paged kernel launched eagerly (side by side, same process).",
             ]
    if r["points"]:
        lines += ["", "| mode | context x batch | TPOT ms | floor ms | x floor | host ms before replay/launch end |",
                  "|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(f"| {p['mode']} | {p['context']} x {p['batch']} | {p['tpot_ms']:.2f} | {p['floor_ms']:.2f} | "
                     f"{p['x_floor']:.2f}x | {p['host_launch_ms']:.2f} |")
    t = r["ttft"]
    if t:
        first = f"first after warm-up {t['first_ms']:.1f} ms; " if "first_ms" in t else ""
        lines += ["", f"TTFT of a {t['tokens']}-token prompt, engine only: {first}repeated length "
                  f"{', '.join(f'{x:.1f}' for x in t['repeated_ms'])} ms; lengths never seen before "
                  f"{', '.join(f'{x:.1f}' for x in t['new_length_ms'])} ms."]
    if r.get("stall"):
        s = r["stall"]
        lines += ["", f"Stall test: {s['streams']} streams at {s['stream_context']} tokens decoding while a "
                  f"{s['long_context']}-token prompt is prefilled in chunks: the longest gap between two tokens of "
                  f"the streams {s['max_gap_ms']:.1f} ms; the long prompt's TTFT {s['long_ttft_with_streams_ms']:.0f} ms "
                  f"against {s['long_ttft_alone_ms']:.0f} ms alone ({s['long_ttft_with_streams_ms'] / s['long_ttft_alone_ms']:.2f}x)."]
    lines += load_lines(r)
    return "\n".join(lines + ["", end])


def render(result: Path, doc: Path) -> None:
    put_section(doc, *markers(result), markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--modes", default="graph,compiled,eager", help="graph | compiled (graph + torch.compile) | eager")
    p.add_argument("--no-stall", action="store_true")
    p.add_argument("--no-decode", action="store_true", help="skip the decode points (serving behaviour only)")
    p.add_argument("--no-load", action="store_true", help="skip the in-engine load (bench.serve's, without HTTP)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--name", default=None)
    p.add_argument("--render", type=Path, default=None, help="write this result's section into --doc and stop")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args(argv)
    if args.render:
        render(args.render, args.doc)
        return 0
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    cfg = PRESETS[args.preset]
    pr = probe(dev)
    print(f"probe: {pr}", flush=True)
    points = POINTS["cuda" if dev == "cuda" else "cpu"]
    longest = max(c for c, _ in points) + args.steps + 16
    result = {"preset": args.preset, "device": pr["device"], "probe": pr, "points": [], "ttft": {}, "stall": None, "load": None,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "python": platform.python_version(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m bench.engine", *(argv or sys.argv[1:])])}
    for k, mode in enumerate(args.modes.split(",")):
        # Prefix caching off: the repeated-prompt TTFT below must prefill again (bench/prefix.py
        # measures the cache).
        ec = EngineConfig(model=args.preset, device=dev, cuda_graphs=(mode != "eager"), prefix_caching=False,
                          torch_compile=(mode == "compiled"), max_num_seqs=64,
                          max_prefill_tokens=16384, max_model_len=max(longest, 131072 if dev == "cuda" else 4096),
                          kv_capacity_tokens=600_000 if dev == "cuda" else 20_000)
        t0 = time.perf_counter()
        engine = LLMEngine(ec)  # warmed up by its constructor
        print(f"{mode}: engine ready in {time.perf_counter() - t0:.1f}s (kernel {engine.kernel.name})", flush=True)
        n = 2000 if dev == "cuda" else 200
        if k == 0:  # the first request after warm-up, before anything else ran
            first = profiled(lambda: ttft(engine, n, 7), "first request after warm-up")
        for i, (ctx, b) in enumerate([] if args.no_decode else points):
            r = decode_point(engine, ctx, b, args.steps, seed=100 * i)
            r["mode"] = mode
            r["floor_ms"] = 1e3 * decode_floor_s(cfg, r["kv_rows"], b, 0, 2 if dev == "cuda" else 4, pr["copy_bytes_per_s"])
            r["x_floor"] = r["tpot_ms"] / r["floor_ms"]
            result["points"].append(r)
            print(json.dumps(r), flush=True)
        if k == 0:  # serving behaviour, on the first (default) mode
            engine.set_token_budget(EngineConfig().max_prefill_tokens)
            repeated = [ttft(engine, n, 7) for _ in range(2)]
            new = [ttft(engine, n + 1 + 2 * i, 8 + i) for i in range(3)]
            result["ttft"] = {"tokens": n, "first_ms": 1e3 * first, "repeated_ms": [1e3 * t for t in repeated],
                              "new_length_ms": [1e3 * t for t in new]}
            print(json.dumps(result["ttft"]), flush=True)
            if not args.no_load:
                c, reqs, n_in, n_out = (64, 128, 1000, 128) if dev == "cuda" else (8, 16, 100, 16)
                load(engine, c, 8, n_in, n_out, seed=300)  # warm: the first batch's sizes
                result["load"] = load(engine, c, reqs, n_in, n_out, seed=400)
                print(json.dumps(result["load"]), flush=True)
                graphs = engine.runner.graphs
                if graphs is not None:  # side by side: prompt chunks launched eagerly
                    buckets, graphs.buckets = graphs.buckets, SEGMENT_BUCKETS
                    result["load_eager_chunks"] = load(engine, c, reqs, n_in, n_out, seed=400)
                    graphs.buckets = buckets
                    print(json.dumps(result["load_eager_chunks"]), flush=True)
                # Host and device time of prompt-chunk steps beside decodes (the load's first half).
                profiled(lambda: load(engine, c, c, n_in, 8, seed=500), f"{c} prompts of {n_in} tokens, 8 out")
            if not args.no_stall:
                long_ctx = 120000 if dev == "cuda" else 1500
                result["stall"] = stall(engine, 8, 2000 if dev == "cuda" else 100, long_ctx, seed=5)
                print(json.dumps(result["stall"]), flush=True)
        engine = None  # its GPU memory goes before the next mode's engine is built
        if dev == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"engine-{args.preset}-{pr['device'].replace(' ', '_')}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'mode':6} {'point':>10} {'TPOT ms':>8} {'floor ms':>8} {'x floor':>7} {'host ms':>8}")
    for r in result["points"]:
        print(f"{r['mode']:6} {r['context']:>6}x{r['batch']:<3} {r['tpot_ms']:8.2f} {r['floor_ms']:8.2f} "
              f"{r['x_floor']:7.2f} {r['host_launch_ms']:8.2f}")
    t = result["ttft"]
    print(f"TTFT {t['tokens']} tokens: first after warm-up {t['first_ms']:.1f} ms, repeated {min(t['repeated_ms']):.1f} ms, new lengths "
          f"{', '.join(f'{x:.1f}' for x in t['new_length_ms'])} ms")
    if result["stall"]:
        s = result["stall"]
        print(f"stall: {s['streams']} streams, {s['long_context']}-token prompt: max gap {s['max_gap_ms']:.1f} ms; "
              f"its TTFT {s['long_ttft_with_streams_ms']:.0f} ms vs {s['long_ttft_alone_ms']:.0f} ms alone")
    for key in ("load", "load_eager_chunks"):
        if result.get(key):
            ld = result[key]
            print(f"{key} (no HTTP): {ld['concurrency']} in flight, {ld['requests']} x ({ld['prompt_tokens']} in, "
                  f"{ld['max_tokens']} out): {ld['output_tokens_per_s']:.0f} tokens/s; steps {json.dumps(ld['steps'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
