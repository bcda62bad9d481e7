"""python -m bench.scaleup [--model paper] [--device cuda] [--members 1,3] [--repeats 3] [--out DIR]

The pool's scale-up time, measured: from the controller's decision to grow (`ScaleEvent.decided_s`)
to the first base step that uses the new members (`StepRecord.members`), cold (members started
from nothing: a Ray worker, CUDA, the KV arena) and from a warm standby (started, idle, in no
epoch: only the epoch's rendezvous is left). Also the decision to the epoch that holds them.

On one GPU the base and its members share it (fractional Ray GPUs, `--gpu-share`): start-up and
joining are what this measures, not a member's compute. Prints a table; writes scaleup.json under
--out (default $OUT, else bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import ray

from actors.cluster import Cluster
from actors.config import ClusterConfig
from fapool.config import EngineConfig
from fapool.policy import PolicyConfig, PoolCurve
from fapool.sampling import SamplingParams

HOLD_S = 3600.0  # cooldown while measuring: the pool keeps its size between a case's steps


def policy(size: int, cooldown_s: float) -> PolicyConfig:
    """Every prompt wants exactly `size` members (the curve 1:size)."""
    return PolicyConfig(curve=PoolCurve(((1, size),)), max_pool=max(size, 1), cooldown_s=cooldown_s, mode="curve")


def wait(pred, what: str, timeout_s: float = 600.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def one_scaleup(cluster: Cluster, members: int, standby: int, prompt_len: int) -> dict:
    """Shrink to 0 with `standby` warm members ready, then grow to `members` for one request."""
    ctl = cluster.controller
    ray.get(ctl.reconfigure.remote(policy(0, 0.0), standby))
    wait(lambda: cluster.status().size == 0, "the pool to shrink to 0")
    wait(lambda: cluster.status().standby >= standby, f"{standby} warm standby members")
    ray.get(ctl.reconfigure.remote(policy(members, HOLD_S), standby))
    t0 = time.time()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    req = threading.Thread(target=cluster.generate, args=(None, params),
                           kwargs={"prompt_token_ids": [7] * prompt_len})
    req.start()
    req.join()
    ups = wait(lambda: [e for e in cluster.status().events if e.direction == "up" and e.time_s >= t0
                        and e.to_size >= members], "the scale-up event")
    decided = min(e.decided_s for e in ups if e.decided_s is not None)
    steps = ray.get(cluster.bases[0].step_log.remote(since_s=t0))
    first = next(s for s in steps if s.members >= members)
    return {"members": members, "standby": standby, "warm": standby >= members,
            "decision_to_epoch_s": max(e.time_s for e in ups) - decided,
            "decision_to_first_step_s": first.time_s - decided,
            "arrival_to_first_step_s": first.time_s - t0}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({(r["members"], r["standby"]) for r in runs}):
        rs = [r for r in runs if (r["members"], r["standby"]) == key]
        first = [r["decision_to_first_step_s"] for r in rs]
        rows.append({"members": key[0], "standby": key[1], "warm": rs[0]["warm"], "repeats": len(rs),
                     "decision_to_epoch_s": statistics.median(r["decision_to_epoch_s"] for r in rs),
                     "decision_to_first_step_s": statistics.median(first),
                     "min_s": min(first), "max_s": max(first)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaleup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--members", default="1,3", help="pool sizes to grow to, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--kv-tokens", type=int, default=65536, help="KV per base and per member (tokens)")
    p.add_argument("--gpu-share", type=float, default=None,
                   help="GPUs per actor; default on CUDA: 1 / (1 + 2 x the largest pool), all on one GPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.members.split(",")]
    share = a.gpu_share if a.gpu_share is not None else (1.0 / (1 + 2 * max(sizes)) if a.device == "cuda" else None)
    cfg = ClusterConfig(engine=EngineConfig(model=a.model, device=a.device, kv_capacity_tokens=a.kv_tokens),
                        policy=policy(0, 0.0), member_kv_capacity_tokens=a.kv_tokens, actor_num_gpus=share,
                        max_cpu_members=2 * max(sizes), pool_wait_s=600.0)
    cluster = Cluster.start(cfg)
    runs = []
    try:
        cluster.generate(None, SamplingParams(max_tokens=4), prompt_token_ids=[7] * 16)  # warm the base
        # Cold cases first: the standby only grows (a shrink parks drained members there), so a
        # cold case after a warm one would take warm members.
        for n, standby in [(n, 0) for n in sizes] + [(n, n) for n in sizes]:
            for i in range(a.repeats):
                r = one_scaleup(cluster, n, standby, a.prompt_len)
                runs.append(r | {"repeat": i})
                print(f"members {n} standby {standby} #{i}: {r['decision_to_first_step_s']:.3f} s", flush=True)
    finally:
        cluster.shutdown()
    rows = summarize(runs)
    print(f"\n{'members':>7} {'start':>6} {'decision->epoch s':>18} {'decision->first step s':>23} {'min..max s':>13}")
    for r in rows:
        print(f"{r['members']:>7} {'warm' if r['warm'] else 'cold':>6} {r['decision_to_epoch_s']:>18.3f} "
              f"{r['decision_to_first_step_s']:>23.3f} {r['min_s']:>6.3f}..{r['max_s']:.3f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"what": "bench.scaleup: decision to grow -> first base step using the new members",
              "model": a.model, "device": a.device, "gpu_share": share, "prompt_len": a.prompt_len,
              "kv_tokens": a.kv_tokens, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "runs": runs}
    (out / "scaleup.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'scaleup.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
