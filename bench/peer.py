"""`python -m bench.peer`: FA Pool and vLLM side by side on one GPU, by the same method.

    python -m bench.peer --preset paper --part engine --out $OUT   # in-engine points, both engines
    python -m bench.peer --preset paper --part http --out $OUT     # both servers over HTTP
    python -m bench.peer --combine bench/results/peer-paper-H200-*.json   # one file + docs section

The method, the same for both engines:
- random weights of the preset's shape (vLLM: a config.json and --load-format dummy), greedy,
  ignore_eos, token-id prompts drawn by bench.engine_load.ids / bench.serve.prompt, prefix caching off;
- in-engine: each engine in a process of its own (vLLM with its own packages on the path, its engine
  core in that process), timed by the same functions: bench.engine.decode_point (TPOT: the median
  wall time of a step once every sequence of the batch decodes, host work included), bench.engine.ttft
  (a prompt alone, to its one token), bench.engine_load.load (64 in flight, 128 requests of 1K in /
  128 out); the same limits: 64 sequences, a 16,384-token budget a step (vLLM's default for its
  offline engine on this GPU), 131,072 tokens of context;
- HTTP: `fapool serve --max-pool 0` and `vllm serve`, each as shipped, on one model directory
  (bench/peer_http.py), loaded by bench.serve's aiohttp client on `/v1/completions`.
Each part prints a short table last and writes peer-<preset>-<card>-<part>.json; --combine joins
the parts into peer-<preset>-<card>.json and writes docs/benchmarks.md's "Side by side with vLLM".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.docs import put_section
from bench.floors import decode_floor_s
from fapool.config import PRESETS

START, END = "<!-- bench.peer start -->", "<!-- bench.peer end -->"
GOALS = {"tpot": 0.97, "ttft": 0.95, "rate": 1.1}  # FA Pool / vLLM: at most (times), at least (rates)


def card() -> str:
    """The GPU's name without the vendor (H200), from nvidia-smi so that this process holds no CUDA context."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "cpu"
    name = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "cpu"
    return name.replace("NVIDIA ", "").replace(" ", "_")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def engine_part(args, out: Path) -> dict:
    parts = {}
    for eng in ("vllm", "fapool"):
        env = dict(os.environ)
        if eng == "vllm":  # vLLM's own packages only (not Ray's site: their FastAPI differ)
            env.update(PYTHONPATH=args.vllm_path, VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_ENABLE_V1_MULTIPROCESSING="0")
        js = out / f"{eng}-{args.preset}.json"
        cmd = [sys.executable, "-m", "bench.peer_engine", "--engine", eng, "--preset", args.preset, "--steps",
               str(args.steps), "--ttft-reps", str(args.ttft_reps), "--json", str(js)] + (["--profile"] * args.profile)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        print(f"{eng}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        parts[eng] = json.loads(js.read_text()) if rc == 0 and js.is_file() else {"error": f"exit {rc}"}
    return parts


def rows(r: dict) -> list[dict]:
    """Each point with both figures, FA Pool / vLLM, and whether the goal is met."""
    out = []

    def add(point, fa, vl, goal, lower_better, **extra):
        if fa is None or vl is None:
            return
        ratio = fa / vl
        out.append({"point": point, "fapool": fa, "vllm": vl, "ratio": ratio, "goal": goal,
                    "met": ratio <= goal if lower_better else ratio >= goal, **extra})

    eng = r.get("engine", {})
    fa, vl = eng.get("fapool", {}), eng.get("vllm", {})
    cfg = PRESETS[r["preset"]]
    copy = fa.get("probe", {}).get("copy_bytes_per_s")
    for pf, pv in zip(fa.get("decode", []), vl.get("decode", [])):
        floor = decode_floor_s(cfg, pf["kv_rows"], pf["batch"], 0, 2, copy) * 1e3 if copy else None
        add(f"TPOT ms, {pf['context'] // 1024}K x {pf['batch']}", pf["tpot_ms"], pv["tpot_ms"], GOALS["tpot"], True,
            floor_ms=floor)
    for tf, tv in zip(fa.get("ttft", []), vl.get("ttft", [])):
        add(f"TTFT ms, {tf['tokens'] // 1024}K", tf["median_ms"], tv["median_ms"], GOALS["ttft"], True)
    if fa.get("load") and vl.get("load"):
        ld = fa["load"]
        add(f"in-engine load tokens/s, {ld['concurrency']} in flight, {ld['requests']} x {ld['prompt_tokens']} in / "
            f"{ld['max_tokens']} out", ld["output_tokens_per_s"], vl["load"]["output_tokens_per_s"], GOALS["rate"], False)
    http = r.get("http", {})
    for lf, lv in zip(http.get("fapool", {}).get("loads", []), http.get("vllm", {}).get("loads", [])):
        c = lf["concurrency"]
        add(f"HTTP tokens/s, concurrency {c}", lf["output_tokens_per_s"], lv["output_tokens_per_s"], GOALS["rate"], False)
        for q in ("p50", "p99"):
            add(f"HTTP TTFT {q} ms, concurrency {c}", lf["ttft_ms"][q], lv["ttft_ms"][q], GOALS["ttft"], True)
            add(f"HTTP TPOT {q} ms, concurrency {c}", lf["tpot_ms"][q], lv["tpot_ms"][q], GOALS["tpot"], True)
    return out


def table(r: dict) -> list[str]:
    lines = [f"| point | vLLM {r.get('vllm_version', '')} | FA Pool {r.get('commit', '')} | FA / vLLM | goal | met |",
             "|---|---|---|---|---|---|"]
    for p in r["points"]:
        fmt = (lambda x: f"{x:,.0f}") if "tokens/s" in p["point"] else (lambda x: f"{x:.3f}" if x < 100 else f"{x:,.1f}")
        goal = ("<= " if "tokens/s" not in p["point"] else ">= ") + f"{p['goal']:.2f}"
        floor = f" (floor {p['floor_ms']:.3f})" if p.get("floor_ms") else ""
        lines.append(f"| {p['point']}{floor} | {fmt(p['vllm'])} | {fmt(p['fapool'])} | {p['ratio']:.3f} | {goal} | "
                     f"{'yes' if p['met'] else '**no**'} |")
    return lines


def combine(paths: list[Path], out_dir: Path, doc: Path | None) -> list[Path]:
    """Join each preset's part files into peer-<preset>-<card>.json; write the docs section from all."""
    merged: dict[tuple[str, str], dict] = {}
    for p in paths:
        part = json.loads(p.read_text())
        key = (part["preset"], part["card"])
        m = merged.setdefault(key, {"preset": part["preset"], "card": part["card"], "parts": {}})
        m["parts"][p.stem] = {k: part[k] for k in ("date", "commit", "command") if k in part}
        for k in ("engine", "http"):  # two part files of one kind (say, each server's) add up
            m.setdefault(k, {}).update(part.get(k, {}))
        for k in ("vllm_version", "commit", "date"):
            if part.get(k):
                m.setdefault(k, part[k])
    written = []
    for (preset, cardname), m in merged.items():
        m["points"] = rows(m)
        f = out_dir / f"peer-{preset}-{cardname}.json"
        f.write_text(json.dumps(m, indent=1))
        written.append(f)
    if doc is not None:
        put_section(doc, START, END, section([json.loads(f.read_text()) for f in written]))
    return written


def section(results: list[dict]) -> str:
    """docs/benchmarks.md's "Side by side with vLLM": the method, then each result's points."""
    lines = [START, "## Side by side with vLLM (`python -m bench.peer`)", "",
             "How the methods were made equal:", ""]
    method = __doc__.split("The method, the same for both engines:")[1].split("Each part prints")[0]
    lines += ["- " + " ".join(item.split()) for item in method.split("\n- ") if item.strip()] + [""]
    for r in results:
        parts = "; ".join(f"{k}: `{v.get('command', '')}` at {v.get('commit', '?')}, {v.get('date', '?')}"
                          for k, v in r["parts"].items())
        lines += [f"### {r['preset']} on {r['card']}", "", f"Raw: `bench/results/peer-{r['preset']}-{r['card']}.json`; "
                  f"{parts}.", ""] + table(r) + [""]
        for eng in ("fapool", "vllm"):
            st = r.get("http", {}).get(eng, {}).get("stall")
            if st:
                lines.append(f"- Stall, {eng}: 8 streams at 2,000 tokens while a {st['long_tokens']:,}-token prompt "
                             f"arrives: largest gap between two events of a stream {st['max_gap_ms']:.1f} ms (p50 "
                             f"{st['gap_during_p50_ms']:.2f} ms; before it, events come in gathered bursts, p50 "
                             f"{st['gap_before_p50_ms']:.2f} ms); the long prompt's TTFT {st['long_ttft_with_streams_ms']:.0f} ms vs "
                             f"{st['long_ttft_alone_ms']:.0f} ms alone.")
        lines.append("")
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--part", choices=["engine", "http"], default="engine")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--ttft-reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="kernel profiles of each in-engine point, after timing")
    p.add_argument("--http-engines", default="fapool,vllm")
    p.add_argument("--concurrency", default="16,64,128")
    p.add_argument("--requests", type=int, default=128, help="per load (at least its concurrency)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stall-long", type=int, default=120000, help="0: no stall test")
    p.add_argument("--vllm-path", default="/tmp/vllm")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    p.add_argument("--commit", default=None, help="the code's commit, where git cannot see it (a copied tree)")
    p.add_argument("--combine", type=Path, nargs="*", default=None)
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args(argv)
    if args.combine is not None:
        for f in combine(args.combine, Path("bench/results"), args.doc):
            print(f"wrote {f}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    r = {"preset": args.preset, "card": card(), "part": args.part, "commit": args.commit or commit(),
         "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.peer " + " ".join(argv or sys.argv[1:])}
    if args.part == "engine":
        r["engine"] = engine_part(args, args.out)
        r["vllm_version"] = r["engine"]["vllm"].get("vllm")
    else:
        from bench.peer_http import run

        r["http"] = run(args.preset, args.out, Path(os.environ.get("TMPDIR", "/tmp")) / "peer-models",
                        [int(c) for c in args.concurrency.split(",")], args.requests, args.prompt_tokens, args.max_tokens,
                        args.stall_long, args.vllm_path, args.http_engines.split(","), "cpu" if r["card"] == "cpu" else "cuda")
    f = args.out / f"peer-{args.preset}-{r['card']}-{args.part}.json"
    f.write_text(json.dumps(r, indent=1))
    r["points"] = rows(r)
    print("\n" + "\n".join(table(r)))
    print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
