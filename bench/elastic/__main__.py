"""python -m bench.elastic [--duration-s S] [--out FILE] [--quick]

Replays each workload at 50% and 80% load of the 8 bases through FA Pool with the default settings
(the SLO policy, its cost model refit online from the replayed steps), the paper's curve, static
pools of 0/8/16/32, and static TP; tunes the curve and cooldown; writes the result JSON, the plots
and the docs/benchmarks.md section."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from bench.elastic.costs import load
from bench.elastic.metrics import summarize
from bench.elastic.replay import Setup, replay
from bench.elastic.workloads import WORKLOADS, generate, mean_shape
from fapool.policy import DEFAULT_CURVE, PolicyConfig, PoolCurve

DEFAULT = "FA Pool (default)"

ROOT = Path(__file__).resolve().parents[2]
LOADS = (0.5, 0.8)
TUNE_CURVES = ("32768:4,65536:8", "16384:4,32768:8,65536:16", "8192:4,16384:8,32768:16",
               "16384:8,32768:16,65536:32", DEFAULT_CURVE)
TUNE_COOLDOWNS_S = (5.0, 120.0)


def rate_for(w, load_frac: float, costs, setup: Setup) -> float:
    """Requests/s that keep `load_frac` of the bases' batch slots busy: each request holds a slot
    for its prefill plus its output at the step time of a full batch at the mix's mean context."""
    prompt, out, ctx = mean_shape(w)
    slot_s = costs.prefill_s(int(prompt), 0) + out * costs.decode_s(setup.max_num_seqs, setup.max_num_seqs * ctx, 0)
    return load_frac * setup.num_bases * setup.max_num_seqs / slot_s


def setups() -> list[Setup]:
    return [Setup(DEFAULT, PolicyConfig()), Setup("FA Pool (paper curve)", PolicyConfig(mode="curve")),
            *(Setup(f"static pool {p}", static_pool=p) for p in (0, 8, 16, 32)),
            *(Setup(f"static TP{k} (8x{k} GPUs)", tp=k) for k in (2, 4))]


def _thin(trace: list, points: int = 600) -> list:
    """(time, pool GPUs, longest context) every few ticks, for the plot."""
    return [(round(t, 2), g, c) for t, g, c in trace[:: max(1, len(trace) // points)]]


def run_workload(name: str, duration_s: float, seed: int, costs, tune: bool) -> dict:
    w = WORKLOADS[name]
    out = {"params": w.params(), "seed": seed, "duration_s": duration_s, "loads": {}}
    for lf in LOADS:
        rate = rate_for(w, lf, costs, Setup("ref"))
        trace = generate(w, rate, duration_s, seed)
        rows, traces = [], {}
        for st in setups():
            o = replay(st, trace, costs)
            rows.append(summarize(o) | ({"online_fit": fit_summary(o.fits)} if o.fits else {}))
            if st.name == DEFAULT:
                traces["default"] = o.pool_trace
        ref = next(r for r in rows if r["name"] == "static pool 32")
        tuned = []
        if tune and lf == LOADS[-1]:  # the tuning grid at the higher load only (CPU time)
            for curve in TUNE_CURVES:
                for cd in TUNE_COOLDOWNS_S:
                    st = Setup(f"FA Pool {curve} cooldown {cd:g}s",
                               PolicyConfig(mode="curve", curve=PoolCurve.parse(curve), cooldown_s=cd))
                    o = replay(st, trace, costs)
                    r = summarize(o) | {"curve": curve, "cooldown_s": cd}
                    tuned.append(r)
                    traces[st.name] = o.pool_trace
        ok = [r for r in tuned if r["tpot_p99_ms"] <= ref["tpot_p99_ms"] and r["refused"] <= ref["refused"]]
        best = min(ok, key=lambda r: r["gpu_seconds"]) if ok else None
        if best:
            traces["best"] = traces[best["name"]]
        fa = rows[0]
        out["loads"][str(lf)] = {
            "rate_per_s": rate, "requests": len(trace), "rows": rows, "tuning": tuned, "best": best,
            "saving_vs_static32": 1 - fa["gpu_seconds"] / ref["gpu_seconds"],
            "best_saving_vs_static32": None if best is None else 1 - best["gpu_seconds"] / ref["gpu_seconds"],
            "pool_trace": {k: _thin(v) for k, v in traces.items() if k in ("default", "best")},
        }
    return out


def fit_summary(fits: list) -> dict:
    """The last online fit of a replay and the largest error any refit had (median over its steps)."""
    last = fits[-1]
    errs = [f.decode_error for f in fits if f.decode_error is not None]
    return {"decode": last.decode, "prefill": last.prefill, "decode_error": last.decode_error,
            "prefill_error": last.prefill_error, "decode_error_max_over_refits": max(errs, default=None),
            "decode_samples": last.decode_samples, "decode_pooled_samples": last.decode_pooled_samples,
            "refits": len(fits)}


SENSITIVITY_D_S = 0.2e-3  # a member cost below the 32-member break-even at 64K x 8 (report.break_even)


def sensitivity(name: str, duration_s: float, seed: int, costs, d_s: float) -> list[dict]:
    """The same trace at the top load with the member cost d replaced: would a cheaper exchange pay?"""
    w = WORKLOADS[name]
    cheap = replace(costs, model=replace(costs.model, d=d_s))
    trace = generate(w, rate_for(w, LOADS[-1], costs, Setup("ref")), duration_s, seed)
    runs = [Setup(DEFAULT, PolicyConfig()), Setup("FA Pool (paper curve)", PolicyConfig(mode="curve")),
            Setup("static pool 0", static_pool=0),
            Setup("static pool 8", static_pool=8), Setup("static pool 32", static_pool=32)]
    return [summarize(replay(st, trace, cheap)) for st in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/elastic-paper-H200-model.json"))
    ap.add_argument("--docs", action="store_true", help="also write the plots and the docs section")
    a = ap.parse_args()
    costs = load()
    result = {"what": "bench.elastic replay: 8 bases, up to 32 pool GPUs, paper model, step times from the "
                      "cost model; the default policy refits its own cost model online from the replayed steps", "fit": costs.fit_errors(), "workloads": {},
              "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.elastic --docs"}
    for name in a.workloads.split(","):
        t0 = time.monotonic()
        result["workloads"][name] = run_workload(name, a.duration_s, a.seed, costs, not a.no_tune)
        result["workloads"][name]["replay_wall_s"] = time.monotonic() - t0
        result["workloads"][name]["sensitivity"] = {
            "d_s": SENSITIVITY_D_S, "load": LOADS[-1],
            "rows": sensitivity(name, a.duration_s, a.seed, costs, SENSITIVITY_D_S)}
        result["workloads"][name]["replay_wall_s"] = time.monotonic() - t0
        print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    Path(a.out).write_text(json.dumps(result))
    if a.docs:
        from bench.elastic.report import write_docs
        write_docs(result, ROOT)


if __name__ == "__main__":
    main()
