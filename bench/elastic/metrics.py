"""What a replay reports: GPU-seconds, TPOT p50/p99, TTFT p99 (all, and of short requests), refused and
queued, scale events."""
from __future__ import annotations

import numpy as np

from bench.elastic.replay import Outcome

SHORT_PROMPT = 4096  # "short": below the pool's threshold, a request that never needs it


def summarize(o: Outcome) -> dict:
    done = [s for s in o.seqs if s.done_s >= 0]
    tpot = [(s.done_s - s.first_s) / (s.req.output - 1) for s in done if s.req.output > 1]
    ttft = [s.first_s - s.req.arrival_s for s in done]
    short_ttft = [s.first_s - s.req.arrival_s for s in done if s.req.prompt < SHORT_PROMPT]
    long_tpot = [(s.done_s - s.first_s) / (s.req.output - 1) for s in done
                 if s.req.output > 1 and s.req.prompt >= 16384]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    hours = o.duration_s / 3600
    return {
        "name": o.setup.name,
        "gpu_seconds": o.gpu_seconds,
        "mean_gpus": o.gpu_seconds / o.duration_s if o.duration_s else 0.0,
        "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
        "tpot_p99_long_ms": None if not long_tpot else 1e3 * pct(long_tpot, 99),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_p99_short_s": pct(short_ttft, 99),
        "completed": len(done), "unfinished": len(o.seqs) - len(done),
        "refused": o.refused, "queued": o.queued,
        "scale_events_per_hour": (o.scale_events["up"] + o.scale_events["down"]) / hours if hours else 0.0,
        "duration_s": o.duration_s,
    }
