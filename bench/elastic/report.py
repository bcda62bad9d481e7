"""The docs for a bench.elastic result: one plot per workload and the docs/benchmarks.md section
(between its own markers; the other tools' sections stay as they are)."""
from __future__ import annotations

from pathlib import Path

from bench.docs import put_section
from fapool.policy import PolicyConfig

START, END = "<!-- bench.elastic start -->", "<!-- bench.elastic end -->"


def plot(name: str, w: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(w["loads"])
    fig, axes = plt.subplots(2, len(loads), figsize=(6 * len(loads), 8))
    for col, lf in enumerate(loads):
        d = w["loads"][lf]
        ax = axes[0][col]
        for key, style in (("default", "-"), ("best", "--")):
            tr = d["pool_trace"].get(key)
            if tr:
                ax.plot([t for t, _, _ in tr], [g for _, g, _ in tr], style, label=f"pool GPUs ({key} curve)")
        tr = d["pool_trace"]["default"]
        ax2 = ax.twinx()
        ax2.plot([t for t, _, _ in tr], [c / 1024 for _, _, c in tr], color="gray", alpha=0.5, lw=0.7)
        ax2.set_ylabel("longest context in flight (K tokens)", color="gray")
        ax.set(title=f"{name}, {float(lf):.0%} load: pool size over time", xlabel="s", ylabel="pool GPUs")
        ax.legend(loc="upper left", fontsize=8)
        ax = axes[1][col]
        for r in d["rows"] + d["tuning"]:
            tuned = "curve" in r
            ax.scatter(r["gpu_seconds"], r["tpot_p99_ms"], s=12 if tuned else 40,
                       marker="." if tuned else "o", color="lightgray" if tuned else None,
                       label=None if tuned else r["name"])
        ax.set(xlabel="GPU-seconds", ylabel="p99 TPOT (ms)", title="every policy (grey: tuning grid)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def break_even(c: dict, kv_bytes: int, copy_bytes_per_s: float, batch: int = 8, context: int = 65536) -> str:
    """The member cost per step below which the pool shortens a base's step at context x batch:
    P members shared by 8 bases cut its KV read to 1/(P/8 + 1) and add d·P."""
    read_s = c["c"] * batch * context * kv_bytes / copy_bytes_per_s
    parts = [f"{p} members: d < {read_s * (1 - 1 / (p / 8 + 1)) / p * 1e3:.2f} ms" for p in (8, 32)]
    return (f"Break-even at {context // 1024}K x {batch} a base (KV read {read_s * 1e3:.1f} ms a step): "
            f"{'; '.join(parts)}, against {c['d'] * 1e3:.2f} ms fitted.")


def overall_best(result: dict) -> dict | None:
    """The tuned (curve, cooldown) within the static 32 pool's p99 on every workload, with the
    fewest GPU-seconds summed over them (at the load the grid ran)."""
    totals: dict[tuple[str, float], float] = {}
    fails: set[tuple[str, float]] = set()
    for w in result["workloads"].values():
        for d in w["loads"].values():
            if not d["tuning"]:
                continue
            s32 = next(r for r in d["rows"] if r["name"] == "static pool 32")
            for r in d["tuning"]:
                key = (r["curve"], r["cooldown_s"])
                totals[key] = totals.get(key, 0.0) + r["gpu_seconds"]
                if r["tpot_p99_ms"] > s32["tpot_p99_ms"] or r["refused"] > s32["refused"]:
                    fails.add(key)
    ok = {k: v for k, v in totals.items() if k not in fails}
    if not ok:
        return None
    (curve, cooldown), gpu_s = min(ok.items(), key=lambda kv: kv[1])
    return {"curve": curve, "cooldown_s": cooldown, "gpu_seconds": gpu_s}


def recommend(result: dict) -> str:
    best = overall_best(result)
    per = []
    for name, w in result["workloads"].items():
        for lf, d in w["loads"].items():
            if d["best"]:
                b = d["best"]
                per.append(f"{name}: `{b['curve']}` cooldown {b['cooldown_s']:g} s "
                           f"({d['best_saving_vs_static32']:.0%} fewer GPU-seconds than static 32, "
                           f"p99 TPOT {b['tpot_p99_ms']:.0f} ms)")
    text = (f"Grid: curves {sorted({r['curve'] for w in result['workloads'].values() for d in w['loads'].values() for r in d['tuning']})} "
            f"x cooldowns {sorted({r['cooldown_s'] for w in result['workloads'].values() for d in w['loads'].values() for r in d['tuning']})} s, "
            f"at the {max(float(k) for w in result['workloads'].values() for k in w['loads']):.0%} load. "
            f"Best per workload: " + "; ".join(per) + ".")
    if best:
        text += (f" One setting for all four: **`--pool-curve {best['curve']} --pool-cooldown-s {best['cooldown_s']:g}`** "
                 f"(within the static 32 pool's p99 TPOT everywhere, fewest GPU-seconds in total).")
    text += (" The fixed curves are kept as an explicit policy (`--pool-policy curve`); the default is the SLO "
             "policy, which needs no tuning per workload: it sizes the pool from the bases' measured steps, so "
             "when a member does pay (a cheaper exchange than this fit's, see above) it grows the pool without a new curve.")
    return text


def answer(result: dict) -> str:
    """The headline at the tuning load: the default against static 32, static 0 and the best curve."""
    top = str(max(float(k) for w in result["workloads"].values() for k in w["loads"]))
    parts, ok = [], 0
    for name, w in result["workloads"].items():
        d = w["loads"][top]
        rows = {r["name"]: r for r in d["rows"]}
        fa, s32 = d["rows"][0], rows["static pool 32"]
        best = d["best"]
        meets = (d["saving_vs_static32"] >= 0.30 and fa["tpot_p99_ms"] <= s32["tpot_p99_ms"]
                 and (best is None or fa["gpu_seconds"] <= best["gpu_seconds"]))
        ok += meets
        parts.append(f"{name}: {d['saving_vs_static32']:.0%} fewer GPU-seconds than static 32 at p99 TPOT "
                     f"{fa['tpot_p99_ms']:.1f} against {s32['tpot_p99_ms']:.1f} ms"
                     + (f", {fa['gpu_seconds']:.0f} against the best curve's {best['gpu_seconds']:.0f}" if best else ""))
    return (f"**Answer ({float(top):.0%} load, every figure with the fit error above):** the default settings "
            f"(`--pool-policy slo`, {PolicyConfig().tpot_slo_ms:g} ms TPOT, {PolicyConfig().ttft_slo_ms:g} ms TTFT) "
            f"meet the goal (>= 30% fewer GPU-seconds than static 32 at a p99 TPOT no worse, no more than "
            f"the best fixed curve) on {ok} of {len(result['workloads'])} workloads: " + "; ".join(parts) + ". "
            "Why: under this fit a member costs more per step than it saves, so the policy, which learns that "
            "from the pooled steps it tries, keeps the pool near empty: it lands next to static 0, which is "
            "the point. The 30% goal against static 32 is easy here because static 32 is the slowest "
            "arrangement in this model, not because the pool pays.")


def online_fits(result: dict) -> str:
    """What the default policy's own fit learned in each replay, and how far off it was."""
    parts = []
    for name, w in result["workloads"].items():
        for lf, d in w["loads"].items():
            f = d["rows"][0].get("online_fit")
            if not f or f["decode_error"] is None:
                continue
            a, b, c, dd = f["decode"]
            parts.append(f"{name} at {float(lf):.0%}: median error {f['decode_error']:.1%} (worst refit "
                         f"{f['decode_error_max_over_refits']:.1%}) over {f['decode_samples']} decode steps, "
                         f"{f['decode_pooled_samples']} of them pooled, d = {dd * 1e3:.2f} ms")
    return ("**The online fit** (`fapool/costfit.py`, the same code the controller refits every 5 s from the "
            "bases' step logs and exports as `fapool_cost_fit_error`): here it fits the replay's own steps, "
            "which the cost model above generates, so its error measures how well the policy's simple form "
            "(one decode step a base per tick, members' shared load left out) tracks them, not the GPU. "
            + "; ".join(parts) + ". Where no step used the pool, d keeps its optimistic prior of 0.")


def section(result: dict) -> str:
    fit = result["fit"]
    dec0, decp, pre = fit["decode_pool0"], fit["decode_pooled"], fit["prefill"]
    err = (f"TPOT fit error: median {dec0['median']:.0%} / max {dec0['max']:.0%} without a pool, "
           f"median {decp['median']:.0%} / max {decp['max']:.0%} with one; "
           f"TTFT fit error median {pre['median']:.0%} / max {pre['max']:.0%}")
    c = fit["coefficients"]
    lines = [START, "", "## Elasticity at cluster scale (`python -m bench.elastic --docs`, a model, not a GPU run)", "",
             f"A discrete-event replay with a fake clock of each trace through `fapool.policy.decide` and "
             f"`fapool.pool_plan` (the functions `actors/controller.py` calls), 8 bases and up to 32 pool "
             f"GPUs, paper model. Step times: `bench/costmodel.py` fitted on `bench/results/{fit['source']}` "
             f"({err}). Scale-up: {fit['cold_start_s']:.1f} s cold, {fit['warm_start_s'] * 1e3:.0f} ms from warm "
             f"standby (measured). TP: the measured 64K x 8 decode ratios "
             f"{', '.join(f'TP{k} {v:.2f}' for k, v in fit['tp_ratio'].items())} applied to the whole step, and "
             f"prefill split ideally over the TP GPUs (both favour TP). Every figure below carries the fit "
             f"error above. Result: `bench/results/elastic-paper-H200-model.json` (workload parameters, seeds, rates).", "",
             f"**What decides it:** the fit charges each pool member d = {c['d'] * 1e3:.2f} ms per decode step of a "
             f"base (from P = 0, 1, 3 on 4 x H200) and h = {c['h'] * 1e9:.0f} ns per member per prompt token, "
             f"so at 32 members a pooled decode step pays {c['d'] * 32e3:.0f} ms in exchange alone, while the "
             f"KV read it saves is a few ms. Every batch that holds one pooled sequence pays it. Under this "
             f"model the pool never buys TPOT; it buys KV room (a base holds "
             f"{fit['base_kv_tokens'] // 1024}K tokens) and nothing else. Extrapolating d linearly from 3 "
             f"members to 32 is the weakest link; a measured 8- or 32-member step would settle it. "
             f"{break_even(c, fit['kv_bytes_per_token'], fit['copy_bytes_per_s'])}", "",
             "**Absolute times are slow:** the fit's per-sequence term b comes from batches of 1 and 8 "
             "in an eager engine; against today's CUDA-graph engine on 1 x H200 "
             "(`engine-paper-H200.json`) it predicts " + ", ".join(
                 f"{r['model_ms']:.1f} ms for {r['measured_ms']:.1f} measured at {r['context'] // 1024}K x {r['batch']}"
                 for r in fit.get("engine_check", [])) +
             ". So read TPOTs as relative between policies; the pool's exchange cost d is the same kind of "
             "eager-era figure and was not re-measured.", ""]
    lines += [answer(result), "", *([result["note"], ""] if result.get("note") else []), online_fits(result), "",
              "**What is measured and what is modelled:** measured on GPUs: the step times the cost model "
              "is fitted on (4 x H200, pools of 0, 1 and 3 members, an eager engine), the cold start and the "
              "warm-standby scale event. Modelled: everything at 8 bases and up to 32 members (the member cost "
              "d extrapolated from 3 members), the queueing, and the default policy's own online fit, which "
              "here learns from the replayed (modelled) steps. A fit on 8- and 32-member steps on real GPUs "
              "waits for a multi-GPU machine; `python -m bench.scaleup` measures the scale-up time on one GPU.",
              ""]
    for name, w in result["workloads"].items():
        lines += [f"### {name}", "", f"Parameters: `{w['params']}`, seed {w['seed']}, {w['duration_s']:.0f} s of arrivals "
                  f"(replay took {w['replay_wall_s']:.0f} s on CPU). Plot: `docs/elastic-{name}.png`.", ""]
        for lf, d in w["loads"].items():
            lines += [f"{float(lf):.0%} load of the bases: {d['rate_per_s']:.1f} requests/s, {d['requests']} requests.", "",
                      "| policy | GPU-s | mean GPUs | TPOT p50 ms | TPOT p99 ms | TTFT p99 s | short TTFT p99 s | queued | refused | scale events/h |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            rows = d["rows"] + ([d["best"] | {"name": "tuned: " + d["best"]["name"]}] if d["best"] else [])
            for r in rows:
                lines.append(f"| {r['name']} | {r['gpu_seconds']:.0f} | {r['mean_gpus']:.1f} | {_f(r['tpot_p50_ms'])} | "
                             f"{_f(r['tpot_p99_ms'])} | {_f(r['ttft_p99_s'], '{:.2f}')} | {_f(r.get('ttft_p99_short_s'), '{:.2f}')} | "
                             f"{r['queued']} | {r['refused']} | {r['scale_events_per_hour']:.0f} |")
            s32 = next(r for r in d["rows"] if r["name"] == "static pool 32")
            fa = d["rows"][0]
            verdict = ("at a p99 TPOT no worse" if fa["tpot_p99_ms"] <= s32["tpot_p99_ms"] else
                       f"but at a worse p99 TPOT ({fa['tpot_p99_ms']:.1f} against {s32['tpot_p99_ms']:.1f} ms)")
            sv = d["saving_vs_static32"]
            lines += ["", f"FA Pool (default) against the static 32-GPU pool: {abs(sv):.0%} "
                      f"{'fewer' if sv >= 0 else 'more'} GPU-seconds {verdict}." + (
                          f" Tuned ({d['best']['curve']}, cooldown {d['best']['cooldown_s']:g} s): "
                          f"{d['best_saving_vs_static32']:.0%} fewer at p99 {d['best']['tpot_p99_ms']:.0f} ms."
                          if d["best"] else (" No tuned setting met the static 32 pool's p99." if d["tuning"]
                                             else " (The tuning grid ran at the 80% load.)")), ""]
    sens = [(n, w["sensitivity"]) for n, w in result["workloads"].items() if w.get("sensitivity")]
    if sens:
        d_ms = sens[0][1]["d_s"] * 1e3
        lines += ["### If a member cost less", "",
                  f"The same traces at the {sens[0][1]['load']:.0%} load with the member cost d set to {d_ms:.1f} ms "
                  f"(below the 32-member break-even) instead of the fitted {result['fit']['coefficients']['d'] * 1e3:.2f} ms; "
                  "a what-if, not a measurement.", "",
                  "| workload | policy | GPU-s | TPOT p50 ms | TPOT p99 ms | TTFT p99 s | queued | refused |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, sv in sens:
            for r in sv["rows"]:
                lines.append(f"| {n} | {r['name']} | {r['gpu_seconds']:.0f} | {_f(r['tpot_p50_ms'])} | {_f(r['tpot_p99_ms'])} | "
                             f"{_f(r['ttft_p99_s'], '{:.2f}')} | {r['queued']} | {r['refused']} |")
        best = "; ".join(f"{n}: {min(sv['rows'], key=lambda r: r['tpot_p99_ms'])['name']}" for n, sv in sens)
        lines += ["", f"Lowest p99 TPOT with the cheaper member: {best}. The pool's prefill cost h·P·n and the "
                  "base's own per-sequence cost b do not shrink with the pool, so even then a small pool (or none) "
                  "does as well as 32 members at a fraction of the GPU-seconds.", ""]
    lines += ["### Tuning", "", recommend(result), "", END]
    return "\n".join(lines)


def write_docs(result: dict, root: Path) -> None:
    for name, w in result["workloads"].items():
        plot(name, w, root / "docs" / f"elastic-{name}.png")
    put_section(root / "docs" / "benchmarks.md", START, END, section(result), first=False)


if __name__ == "__main__":  # python -m bench.elastic.report RESULT.json: re-render the docs
    import json
    import sys

    write_docs(json.loads(Path(sys.argv[1]).read_text()), Path(__file__).resolve().parents[2])
