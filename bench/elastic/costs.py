"""Step times for the replay: `bench.costmodel` fitted on the committed 4 x H200 pooled run, and
the measured scale-up times and tensor-parallel ratios. Every figure the replay reports carries
this fit's error (`fit_errors`)."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.costmodel import CostModel, fit, predict_prefill

RESULTS = Path(__file__).resolve().parents[1] / "results"
FIT_FILE = "paper-H200x4-full.json"
# Plain TP decode of the paper model at 64K x 8 on 4 x H200 (issue 12): TP1 8.29, TP2 4.35, TP4 3.02 ms.
TP_DECODE_MS = {1: 8.29, 2: 4.35, 4: 3.02}


@dataclass(frozen=True)
class StepCosts:
    model: CostModel
    cold_start_s: float  # a member started from nothing until it is in an epoch (measured)
    warm_start_s: float  # a warm-standby member joining an epoch (measured scale event)
    base_kv_tokens: int  # KV one GPU holds: the measured most concurrent 64K sequences on one base
    source: str = FIT_FILE
    tp_ratio: dict[int, float] = field(default_factory=lambda: {k: v / TP_DECODE_MS[1] for k, v in TP_DECODE_MS.items()})

    def decode_s(self, batch: int, kv_tokens: float, members: int, tp: int = 1) -> float:
        """One decode step of a base: `kv_tokens` is what its busiest GPU reads (its own share or a
        member's, whichever is larger); `members` is how many members it exchanges with."""
        m = self.model
        step = m.a + m.b * batch + m.c * kv_tokens * m.kv_bytes_per_token / m.copy_bytes_per_s + m.d * members
        return step * self.tp_ratio[tp]

    def prefill_s(self, context: int, members: int, tp: int = 1) -> float:
        if tp == 1:
            return predict_prefill(self.model, context, members)
        # TP prefill beyond what was measured: the cost model's compute terms split over tp GPUs
        # (ideal, no all-reduce cost: favours TP).
        no_fixed = predict_prefill(self.model, context, 0) - self.model.e
        return self.model.e + no_fixed / tp

    def fit_errors(self) -> dict:
        """The fit's relative errors (model / measured - 1), as the report quotes them."""
        def summary(points):
            errs = [abs(p.rel_error) for p in points]
            return {"median": statistics.median(errs), "max": max(errs), "points": len(errs)} if errs else None
        dec = self.model.decode_points
        return {"source": self.source,
                "decode_pool0": summary([p for p in dec if p.pool == 0]),
                "decode_pooled": summary([p for p in dec if p.pool > 0]),
                "prefill": summary(self.model.prefill_points),
                "coefficients": {t: getattr(self.model, t) for t in "abcdefgh"},
                "copy_bytes_per_s": self.model.copy_bytes_per_s, "kv_bytes_per_token": self.model.kv_bytes_per_token,
                "tp_ratio": self.tp_ratio,
                "cold_start_s": self.cold_start_s, "warm_start_s": self.warm_start_s,
                "base_kv_tokens": self.base_kv_tokens,
                "engine_check": engine_check(self)}


def engine_check(costs: StepCosts, path: Path = RESULTS / "engine-paper-H200.json") -> list[dict]:
    """The fit against today's single-engine decode (CUDA graphs, 1 x H200): how far off the base's
    own step is at batches the 4 x H200 run (B <= 8, eager) did not measure."""
    if not path.exists():
        return []
    rows = []
    for p in json.loads(path.read_text())["points"]:
        if p["mode"] == "graph":
            model = costs.decode_s(p["batch"], p["batch"] * p["context"], 0)
            rows.append({"context": p["context"], "batch": p["batch"], "measured_ms": p["tpot_ms"],
                         "model_ms": model * 1e3, "ratio": model * 1e3 / p["tpot_ms"]})
    return rows


def load(path: Path = RESULTS / FIT_FILE) -> StepCosts:
    result = json.loads(path.read_text())
    scale = {(s["members"], s["standby"]): s for s in result["scaleup"]}
    cold = scale[(1, 0)]["seconds"]
    warm = next(s["scale_event_s"] for s in result["scaleup"] if s.get("standby"))
    # The most 64K sequences one base held at once without a pool (the "oversized" run).
    alone = next(o for o in result["oversized"] if o["pool"] == 0)
    return StepCosts(fit(result), cold, warm, alone["max_concurrent"] * alone["context"], path.name)
