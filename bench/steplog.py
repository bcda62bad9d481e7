"""`python -m bench.steplog`: what a running server's base engines did, step by step.

    fapool serve --model paper --device cuda &
    python -m bench.steplog --clear             # forget the steps so far
    python -m bench.serve ...                   # the load to look at
    python -m bench.steplog --out $OUT/steps.json

Joins the Ray cluster of the server (RAY_ADDRESS, else the newest local one) and reads every
base's step log. Per step kind and batch size: the steps, their median wall time (the engine's
`step()` call) and the median interval to the next step's start. Interval minus wall is the engine
thread's time outside `step()` (handing events to streams, reports, commands, waiting for the GIL):
where it is large, the serving layer, not the GPU, sets the token rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import ray

from actors import ray_node
from actors.config import NAMESPACE
from actors.supervisor import is_base_name


def base_handles() -> list[tuple[str, object]]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and is_base_name(a["name"])]
    return [(n, ray.get_actor(n, namespace=NAMESPACE)) for n in sorted(names)]


def summarize(steps: list) -> list[dict]:
    """Rows per (kind, batch bucket): count, median wall and interval (ms), tokens per step."""
    groups: dict[tuple[str, int], list[tuple[float, float, int]]] = defaultdict(list)
    for a, b in zip(steps, steps[1:] + [None]):
        gap = (b.time_s - a.time_s) if b is not None else a.wall_s
        bucket = 1 << max(0, (a.num_seqs - 1).bit_length())
        groups[(a.kind, bucket)].append((a.wall_s, gap, a.num_tokens))
    rows = []
    for (kind, bucket), xs in sorted(groups.items()):
        rows.append({"kind": kind, "seqs_up_to": bucket, "steps": len(xs),
                     "wall_ms": 1e3 * statistics.median(x[0] for x in xs),
                     "interval_ms": 1e3 * statistics.median(x[1] for x in xs),
                     "tokens": statistics.median(x[2] for x in xs),
                     "share_of_time": sum(x[1] for x in xs)})
    total = sum(r["share_of_time"] for r in rows) or 1.0
    for r in rows:
        r["share_of_time"] /= total
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steplog", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="auto")
    p.add_argument("--clear", action="store_true", help="read and forget the steps so far; print nothing")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--raw", action="store_true", help="also write every step (start, wall, kind, seqs, tokens)")
    args = p.parse_args(argv)
    ray_node.join(args.address, namespace=NAMESPACE, logging_level="ERROR")  # fapool serve's Ray is on loopback
    result = {}
    for name, h in base_handles():
        steps = ray.get(h.step_log.remote(clear=True))
        if args.clear:
            continue
        rows = summarize(steps)
        result[name] = rows
        if args.raw and steps:
            result[name + "/steps"] = [(round(st.time_s, 4), round(1e3 * st.wall_s, 3), st.kind, st.num_seqs,
                                        st.num_tokens) for st in steps]
        print(f"{name}: {len(steps)} steps")
        print("| kind | seqs <= | steps | wall ms | interval ms | tokens | time share |")
        for r in rows:
            print(f"| {r['kind']} | {r['seqs_up_to']} | {r['steps']} | {r['wall_ms']:.2f} | {r['interval_ms']:.2f} "
                  f"| {r['tokens']:.0f} | {100 * r['share_of_time']:.0f}% |")
    if args.out is not None and not args.clear:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if args.clear or result else 1


if __name__ == "__main__":
    raise SystemExit(main())
