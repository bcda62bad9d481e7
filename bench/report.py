"""`python -m bench.report bench/results/*.json [--out docs/benchmarks.md]`: the benchmark page.

One section per result file: where and how it ran, the measured tables, the issue's targets checked
as PASS / MISS, the paper's table beside ours, and the cost model with its projection. The figures
go to `bench/` next to the page. Every number is read from the result files (the paper's own numbers
are quoted from its section 4.1); anything a file lacks renders as "not measured".
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import plots
from bench.costmodel import PAPER_BASES, CostModel, fit, project

NM = "not measured"
LONG, MID, POOL = 65536, 16384, 3  # the bars: 64K, 16K, pool of 3
# The paper's section 4.1: context -> (TP=8 PP=2 TPOT ms, 8 base + 24 pool TPOT ms).
PAPER_TPOT_MS = {512: (45.0, 41.0), 2048: (78.0, 56.0), 8192: (245.0, 117.0), 16384: (892.0, 279.0)}
PAPER_BASELINE_TPS = {512: 22.2, 2048: 25.6, 8192: 33.4, 16384: 18.3}  # its TPS column, units unstated


@dataclass(frozen=True)
class Target:
    key: str
    bar: str
    status: str  # PASS | MISS | not measured
    detail: str


def host_share(r: dict) -> str:
    host = (r.get("phases") or {}).get("host_launch")
    return f"{host / r['tpot_s']:.0%}" if host is not None and r.get("tpot_s") else NM


def find(rows: list[dict] | None, **match) -> dict | None:
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


def ms(s: float | None) -> str:
    return NM if s is None else f"{s * 1e3:.2f}"


def ms_(s: float | None) -> str:
    return NM if s is None else f"{s * 1e3:.2f} ms"


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _compare(key: str, bar: str, a: float | None, b: float | None, names: tuple[str, str], ok) -> Target:
    """A bar on the ratio a / b of two times; `ok(ratio)` says whether it passes."""
    if a is None or b is None:
        return Target(key, bar, NM, f"{names[0]}: {ms_(a)}, {names[1]}: {ms_(b)}")
    return Target(key, bar, _verdict(ok(a / b)), f"{names[0]} {ms_(a)} / {names[1]} {ms_(b)} = {a / b:.2f}x")


def check_targets(result: dict) -> list[Target]:
    """The issue's bars, each from the measured numbers, or "not measured" when a number is missing."""
    dec, pre, over = result.get("decode"), result.get("prefill"), result.get("oversized")
    d0, d3 = find(dec, pool=0, context=LONG, batch=8), find(dec, pool=POOL, context=LONG, batch=8)
    p0, p3 = find(pre, pool=0, context=LONG), find(pre, pool=POOL, context=LONG)
    ours, hf = find(dec, pool=0, context=MID, batch=1), find((result.get("hf") or {}).get("decode"), context=MID)
    o0, o3 = find(over, pool=0), find(over, pool=POOL)
    k, pools = f"{LONG // 1024}K", ("pool 0", f"pool {POOL}")

    def conc(o: dict | None, pool: int) -> str:
        return f"pool {pool}: {NM}" if o is None else \
            f"pool {pool}: {o['max_concurrent']} of {o['batch']} at once, {o['decode_tps']:.0f} tok/s"
    over_ok = o0 and o3 and o3["max_concurrent"] == o3["batch"] and o0["max_concurrent"] < o0["batch"]
    comm = d3 and d3.get("comm_sync_fraction")
    return [
        _compare("1", f"decode {k} x 8: TPOT pool {POOL} vs pool 0 >= 2.5x",
                 d0 and d0["tpot_s"], d3 and d3["tpot_s"], pools, lambda x: x >= 2.5),
        Target("2", f"oversized batch: all at once with pool {POOL}, not with pool 0",
               NM if not (o0 and o3) else _verdict(bool(over_ok)), f"{conc(o0, 0)}; {conc(o3, POOL)}"),
        _compare("3", f"prefill {k}: TTFT pool {POOL} vs pool 0 >= 1.5x",
                 p0 and p0["ttft_s"], p3 and p3["ttft_s"], pools, lambda x: x >= 1.5),
        _compare("4a", f"pool 0 decode {k} x 8 within 1.5x of the floor",
                 d0 and d0["tpot_s"], d0 and d0["floor_s"], ("pool 0", "floor"), lambda x: x <= 1.5),
        _compare("4b", f"TPOT {MID // 1024}K batch 1, pool 0: >= 10x lower than transformers",
                 hf and hf["tpot_s"], ours and ours["tpot_s"], ("transformers", "pool 0"), lambda x: x >= 10),
        Target("5", f"comm + sync <= 15% of the pooled decode step (pool {POOL}, {k} x 8)",
               NM if comm is None else _verdict(comm <= 0.15),
               NM if comm is None else f"{ms_(d3['comm_sync_s'])} of {ms_(d3['tpot_s'])} = {comm:.1%}"),
    ]


def table(head: list[str], rows: list[list], empty: str = NM) -> list[str]:
    if not rows:
        return [f"_{empty}._", ""]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def header(result: dict) -> list[str]:
    p, m, hf = result.get("probe") or {}, result.get("model") or {}, result.get("hf") or {}
    g = result.get
    return [f"- card: **{g('card', '?')}** x {g('num_gpus', 0):g} GPUs; kernel `{g('kernel', '?')}`",
            f"- torch {g('torch', '?')}, ray {g('ray', '?')}, python {g('python', '?')}, "
            f"transformers {hf.get('transformers', NM)}",
            f"- model `{g('preset', '?')}`: {m.get('params', 0) / 1e9:.3g}B parameters, {m.get('layers')} layers, "
            f"hidden {m.get('hidden')}, {m.get('heads')} heads, FFN {m.get('ffn')}, "
            f"{m.get('kv_bytes_per_token')} KV bytes/token",
            f"- probe: copy {p.get('copy_bytes_per_s', 0) / 1e12:.3g} TB/s, "
            f"matmul {p.get('matmul_flops_per_s', 0) / 1e12:.3g} TFLOP/s, "
            f"attention {p.get('attention_flops_per_s', 0) / 1e12:.3g} TFLOP/s",
            *([f"- decode kernel `{p['decode_kernel']}`: {p.get('decode_shape')} context over a KV arena at "
               f"{p['decode_bytes_per_s'] / 1e12:.3g} TB/s of K and V"] if p.get("decode_kernel") else []),
            f"- command: `{result.get('command', '?')}`", f"- date: {result.get('time', '?')}",
            *([f"- code: {g('code')}"] if g("code") else []), ""]


def measured_tables(result: dict) -> list[str]:
    hf = result.get("hf") or {}
    hf_pre = {r["context"]: r["ttft_s"] for r in hf.get("prefill") or []}
    pre = [[r["pool"], r["context"], ms(r["ttft_s"]), ms(r["floor_s"]), times(r["ttft_s"] / r["floor_s"]),
            times(r.get("speedup_vs_pool0")),
            times(hf_pre[r["context"]] / r["ttft_s"]) if r["context"] in hf_pre else NM]
           for r in result.get("prefill") or []]
    dec = [[r["pool"], r["context"], r["batch"], ms(r["tpot_s"]), ms(r["floor_s"]), times(r["tpot_s"] / r["floor_s"]),
            f"{r['tps']:.0f}", times(r.get("speedup_vs_pool0")),
            f"{r['comm_sync_fraction']:.1%}" if r["pool"] and r.get("comm_sync_fraction") is not None else "–",
            host_share(r)]
           for r in result.get("decode") or []]
    over = [[r["pool"], r["context"], r["batch"], r["max_concurrent"], f"{r['decode_tps']:.0f}",
             f"{r['e2e_tps']:.0f}" if "e2e_tps" in r else NM]
            for r in result.get("oversized") or []]
    scale = [[r["members"], r["standby"],
              f"{r['seconds']:.3f}" if r.get("seconds") is not None else NM,
              f"{r['scale_event_s']:.3f}" if r.get("scale_event_s") is not None else NM,
              r.get("note", "")] for r in result.get("scaleup") or []]
    hf_rows = [["prefill (TTFT)", r["context"], r.get("batch", 1), ms(r["ttft_s"])] for r in hf.get("prefill") or []]
    hf_rows += [["decode (TPOT)", r["context"], r.get("batch", 1), ms(r["tpot_s"])] for r in hf.get("decode") or []]
    return ["### Prefill", "",
            *table(["pool", "context", "TTFT ms", "floor ms", "x floor", "vs pool 0", "vs transformers"], pre),
            "### Decode", "", *table(["pool", "context", "batch", "TPOT ms", "floor ms", "x floor", "TPS", "vs pool 0",
                                      "comm+sync %", "host launch %"], dec),
            "host launch: host time to enqueue a step's GPU work, as a share of the step; near 100% the "
            "host, not the GPU, sets the pace.", "",
            "### Oversized batch (more KV than one GPU holds)", "",
            *table(["pool", "context", "batch", "max concurrent", "decode TPS", "end-to-end TPS"], over),
            "### Scale-up", "", *table(["members", "standby", "seconds to first pooled step", "seconds to scale event", "note"], scale),
            "### Transformers baseline", "", *table(["kind", "context", "batch", "ms"], hf_rows)]


def paper_table(result: dict, proj: list[dict]) -> list[str]:
    """The paper's TPOT table beside our batch-8 measurements and the 8-base projection."""
    dec = result.get("decode") or []
    batch = 8 if find(dec, batch=8) else max((r["batch"] for r in dec), default=8)
    rows = []
    for n in sorted({*PAPER_TPOT_MS, LONG}):
        base, pool = PAPER_TPOT_MS.get(n, (None, None))
        m0, m3 = find(dec, pool=0, context=n, batch=batch), find(dec, pool=POOL, context=n, batch=batch)
        j0 = find(proj, bases=PAPER_BASES, context=n, pool=0)
        j24 = find(proj, bases=PAPER_BASES, context=n, pool=24)
        rows.append([n, "–" if base is None else f"{base:g} → {pool:g}",
                     "–" if base is None else times(base / pool),
                     f"{ms(m0 and m0['tpot_s'])} → {ms(m3 and m3['tpot_s'])}",
                     f"{ms(j0 and j0['tpot_s'])} → {ms(j24 and j24['tpot_s'])}" if j0 else NM,
                     times(j24 and j24["speedup_vs_pool0"]), f"{j0['batch']}" if j0 else "–"])
    tps_note = ", ".join(f"{1024 / (t[0] / 1e3):.0f}" for t in PAPER_TPOT_MS.values())
    return ["### The paper's table (section 4.1) beside ours", "",
            *table(["context", "paper TPOT ms, TP=8 PP=2 → 8 base + 24 pool", "paper x",
                    f"measured TPOT ms, pool 0 → pool {POOL}, batch {batch}",
                    "**projection** TPOT ms, 8 bases, pool 0 → 24", "**projection** x", "projected batch"], rows),
            "The paper ran A100s and a TP=8 PP=2 baseline; our pool 0 is 8 independent bases. Its TPS column is not "
            f"batch/TPOT (1024 sequences / its baseline TPOT gives {tps_note} tokens/s; it lists "
            f"{', '.join(f'{x:g}' for x in PAPER_BASELINE_TPS.values())}), so only TPOT is compared.", ""]


def model_section(model: CostModel, proj: list[dict]) -> list[str]:
    coef = [["a", f"{model.a * 1e3:.3f} ms", "per decode step"],
            ["b", f"{model.b * 1e3:.3f} ms", "per sequence in a step"],
            ["c", f"{model.c:.3f}", "x the busiest GPU's KV-read floor"],
            ["d", f"{model.d * 1e3:.3f} ms", "per member per step"],
            ["e", f"{model.e * 1e3:.3f} ms", "per prefill"], ["f", f"{model.f:.3f}", "x the linear FLOP floor"],
            ["g", f"{model.g:.3f}", "x the busiest GPU's attention FLOP floor"],
            ["h", f"{model.h * 1e9:.3f} ns", "per member per prompt token"]]
    fixed = [f"- `{t}` fixed to 0: {why}" for t, why in model.fixed]

    def err(e: float | None) -> str:
        return NM if e is None else f"{e:.1%} ({'within' if e <= 0.15 else 'outside'} 15%)"
    pts = [[kind, p.pool, p.context, p.batch, ms(p.measured_s), ms(p.predicted_s), f"{p.rel_error:+.1%}"]
           for kind, ps in (("TPOT", model.decode_points), ("TTFT", model.prefill_points)) for p in ps]
    prow = [[r["bases"], r["pool"], r["context"], r["batch"], f"{r['batch_per_base']:g}", ms(r["tpot_s"]),
             f"{r['tps']:.0f}", times(r["speedup_vs_pool0"]), ms(r["ttft_s"]), f"{r['kv_gib_per_gpu']:.3g}",
             ms(r["measured_tpot_s"]) if r["measured_tpot_s"] else "–"] for r in proj]
    max_b = max((p.batch for p in model.decode_points), default=0)
    comm = ("With d fixed to 0 these rows carry **no communication cost**." if "d" in dict(model.fixed)
            else f"Communication: d·P = {model.d * 24e3:.2f} ms at P = 24.")
    return ["### Cost model (bench/costmodel.py)", "",
            "`tpot = a + b·B + c·B·n·kv_bytes/(P+1)/copy_rate + d·P`, "
            "`ttft = e + f·linear_flops/matmul_rate + g·attention_flops/(P+1)/attention_rate + h·P·n`, "
            "least squares on relative error over this file's points.", "",
            *table(["term", "value", "meaning"], coef), *fixed, "",
            f"Largest error: decode {err(model.max_decode_error)}, prefill {err(model.max_prefill_error)}.", "",
            "<details><summary>every point</summary>", "",
            *table(["kind", "pool", "context", "batch", "measured ms", "model ms", "error"], pts), "</details>", "",
            "### Projection (not measured)", "",
            "Every row below is **projection**. 8 bases hold 1024 sequences (128 each); the P members serve all 8, so "
            "the KV is spread over 8 + P GPUs (a base's KV term divides by P/8 + 1) while each base still exchanges "
            f"with all P members (d·P). {comm} b was fitted on batches of at most {max_b} and is extrapolated "
            "to 128 a base; KV that does not fit a card (see KV GiB per GPU) is not modelled.", "",
            *table(["bases", "pool", "context", "batch", "per base", "TPOT ms", "TPS", "vs pool 0", "TTFT ms",
                    "KV GiB per GPU", "measured TPOT ms"], prow)]


def section(name: str, result: dict, fig_dir: Path, fig_rel: str) -> list[str]:
    try:
        model = fit(result)
        proj = project(result, model)
    except (KeyError, ValueError) as e:
        model, proj = None, []
        why = f"cost model not fitted: {e!r}"
    targets = check_targets(result)
    figs = {k: f(result, fig_dir / f"{name}-{k}.png") for k, f in
            (("tpot", plots.tpot), ("ttft", plots.ttft), ("breakdown", plots.breakdown))}
    figs["projection"] = plots.projection(proj, PAPER_TPOT_MS, fig_dir / f"{name}-projection.png")
    pics = [f"![{k}]({fig_rel}/{p.name})" for k, p in figs.items() if p is not None]
    return [f"## {name}", "", *header(result), "### Targets", "",
            *table(["#", "bar", "result", "numbers"], [[t.key, t.bar, f"**{t.status}**", t.detail] for t in targets]),
            *measured_tables(result), *paper_table(result, proj),
            *(model_section(model, proj) if model else [f"_{why}_", ""]), "### Figures", "", *pics, ""]


def render(paths: list[Path], out: Path) -> str:
    fig_dir = out.parent / "bench"
    lines = ["# FA Pool benchmarks", "",
             f"Generated by `python -m bench.report {' '.join(str(p) for p in paths)}` "
             "from `python -m bench.run` results.", ""]
    for p in paths:
        lines += section(p.stem, json.loads(p.read_text()), fig_dir, "bench")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="result JSON files written by bench.run")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(f"no such result file: {', '.join(missing)}; run `python -m bench.run` first")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results, args.out))
    print(f"wrote {args.out} and figures in {args.out.parent / 'bench'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
