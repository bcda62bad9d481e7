"""A small cost model of a decode step (TPOT) and a prefill (TTFT), fitted to one `bench.run` result.

    tpot(n, B, P) = a + b·B + c·B·n·kv_bytes_per_token/(P+1)/copy_rate + d·P
    ttft(n, P)    = e + f·linear_flops(n)/matmul_rate + g·attention_flops(n)/(P+1)/attention_rate + h·P·n

n is the context, B the batch, P the pool size; the rates are the run's own probe. c and g say how far
the attention runs from its floor on the busiest GPU (1 is the floor); d is a member's cost per step,
h its cost per prompt token. The fit is least squares on relative error (each row divided by its
measurement, so a 4 ms point weighs what a 400 ms one does). A coefficient that comes out negative is
fixed to 0 and the rest refitted; a term the data cannot tell apart from the others is fixed to 0 up
front: with one pool size in the file, d and h. `CostModel.fixed` names each fixed term and why.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bench.floors import prefill_flops
from fapool.config import PRESETS, ModelConfig
from fapool.costfit import nonneg_fit

PAPER_BASES = 8
PAPER_BATCH = 1024  # over all bases
PAPER_CONTEXTS = (512, 2048, 8192, 16384)
PAPER_POOLS = (0, 24, 32)
OWN_CONTEXT, OWN_BATCH, OWN_POOLS = 65536, 8, (0, 1, 3)


@dataclass(frozen=True)
class Point:
    pool: int
    context: int
    batch: int
    measured_s: float
    predicted_s: float

    @property
    def rel_error(self) -> float:
        return self.predicted_s / self.measured_s - 1.0


@dataclass(frozen=True)
class CostModel:
    cfg: ModelConfig
    kv_bytes_per_token: int
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    attention_flops_per_s: float
    a: float = 0.0  # s per decode step
    b: float = 0.0  # s per sequence in the step
    c: float = 0.0  # x the busiest GPU's KV-read floor
    d: float = 0.0  # s per pool member per step
    e: float = 0.0  # s per prefill
    f: float = 0.0  # x the linear-layer FLOP floor
    g: float = 0.0  # x the busiest GPU's attention FLOP floor
    h: float = 0.0  # s per pool member per prompt token
    fixed: tuple[tuple[str, str], ...] = ()  # (term, why it is 0)
    decode_points: tuple[Point, ...] = ()
    prefill_points: tuple[Point, ...] = ()

    @property
    def max_decode_error(self) -> float | None:
        return max((abs(p.rel_error) for p in self.decode_points), default=None)

    @property
    def max_prefill_error(self) -> float | None:
        return max((abs(p.rel_error) for p in self.prefill_points), default=None)


def decode_terms(m: CostModel, context: int, batch: float, pool: int, kv_parts: float | None = None) -> list[float]:
    parts = pool + 1 if kv_parts is None else kv_parts
    return [1.0, batch, batch * context * m.kv_bytes_per_token / parts / m.copy_bytes_per_s, float(pool)]


def prefill_terms(m: CostModel, context: int, pool: int) -> list[float]:
    linear, attention = prefill_flops(m.cfg, context)
    return [1.0, linear / m.matmul_flops_per_s, attention / (pool + 1) / m.attention_flops_per_s,
            float(pool * context)]


def predict_decode(m: CostModel, context: int, batch: float, pool: int, kv_parts: float | None = None) -> float:
    """TPOT in seconds; `kv_parts` (default pool + 1) is how many GPUs share this base's KV reads."""
    return float(np.dot([m.a, m.b, m.c, m.d], decode_terms(m, context, batch, pool, kv_parts)))


def predict_prefill(m: CostModel, context: int, pool: int) -> float:
    """TTFT in seconds of one prompt of `context` tokens."""
    return float(np.dot([m.e, m.f, m.g, m.h], prefill_terms(m, context, pool)))


def fit(result: dict, cfg: ModelConfig | None = None) -> CostModel:
    """Calibrate on every measured decode and prefill point of one result file."""
    cfg = cfg or PRESETS[result["preset"]]
    probe, kvb = result["probe"], result["model"]["kv_bytes_per_token"]
    if kvb not in (cfg.kv_bytes_per_token(2), cfg.kv_bytes_per_token(4)):
        raise ValueError(f"result's kv_bytes_per_token={kvb} does not match the {result['preset']!r} preset; "
                         "pass the ModelConfig the run used as cfg")
    m = CostModel(cfg, kvb, probe["copy_bytes_per_s"], probe["matmul_flops_per_s"], probe["attention_flops_per_s"])
    fixed: dict[str, str] = {}
    dec, pre = result.get("decode") or [], result.get("prefill") or []
    for rows, names in ((dec, "abcd"), (pre, "efgh")):
        if not rows:
            fixed.update({t: "no points measured" for t in names})
            continue
        if len({r["pool"] for r in rows}) < 2:  # P·x is then a multiple of another column
            fixed[names[3]] = f"one pool size measured (P={rows[0]['pool']}): member cost unidentifiable"
        if names == "abcd" and len({r["batch"] for r in rows}) < 2:
            fixed["b"] = f"one batch size measured (B={rows[0]['batch']})"
    coef: dict[str, float] = {}
    if dec:
        X = np.array([decode_terms(m, r["context"], r["batch"], r["pool"]) for r in dec])
        coef |= nonneg_fit(X, np.array([r["tpot_s"] for r in dec]), "abcd", fixed)
    if pre:
        X = np.array([prefill_terms(m, r["context"], r["pool"]) for r in pre])
        coef |= nonneg_fit(X, np.array([r["ttft_s"] for r in pre]), "efgh", fixed)
    m = replace(m, **coef, fixed=tuple(sorted(fixed.items())))
    return replace(
        m,
        decode_points=tuple(Point(r["pool"], r["context"], r["batch"], r["tpot_s"],
                                  predict_decode(m, r["context"], r["batch"], r["pool"])) for r in dec),
        prefill_points=tuple(Point(r["pool"], r["context"], 1, r["ttft_s"],
                                   predict_prefill(m, r["context"], r["pool"])) for r in pre))


def project(result: dict, m: CostModel) -> list[dict]:
    """The paper's arrangement predicted from this file's coefficients (every row has projection=True).

    8 bases each hold the whole model and an equal share of the batch (1024 sequences: 128 a base);
    P = 24 or 32 members serve all 8 bases, and every base's pool group holds all P members. So all
    KV of the batch is spread evenly over 8 + P GPUs: a base's B sequences are read by (P/8 + 1) GPUs'
    worth of bandwidth, the KV term divides by P/8 + 1, not P + 1. But each base still exchanges
    with all P members every step, so the communication term is d·P with P = 24 or 32. Members take
    the 8 bases' requests concurrently (their time is already in the KV term). Not modelled: KV that
    does not fit (see kv_gib_per_gpu: at 16K tokens and P = 0 a base needs 128 GiB), the paper's
    A100s (the coefficients are this card's), and member cost when d was fixed to 0 (see m.fixed).
    ttft_s is one prompt alone, its attention split over all P members. Also: our 64K x 8 point on
    one base with P = 0, 1, 3, beside its measurement when there is one.
    """
    if not m.decode_points:
        return []
    measured = {(r["pool"], r["context"], r["batch"]): r["tpot_s"] for r in result.get("decode") or []}
    rows: list[dict] = []
    configs = [(PAPER_BASES, n, PAPER_BATCH, PAPER_POOLS) for n in PAPER_CONTEXTS]
    configs += [(PAPER_BASES, OWN_CONTEXT, OWN_BATCH * PAPER_BASES, PAPER_POOLS),
                (1, OWN_CONTEXT, OWN_BATCH, OWN_POOLS)]
    for bases, n, batch, pools in configs:
        per_base = batch / bases
        base0 = predict_decode(m, n, per_base, 0)
        for pool in pools:
            tpot = predict_decode(m, n, per_base, pool, kv_parts=pool / bases + 1)
            ttft = predict_prefill(m, n, pool) if m.prefill_points else None
            rows.append({"projection": True, "bases": bases, "pool": pool, "context": n, "batch": batch,
                         "batch_per_base": per_base, "tpot_s": tpot, "tps": batch / tpot,
                         "speedup_vs_pool0": base0 / tpot, "ttft_s": ttft,
                         "kv_gib_per_gpu": batch * n * m.kv_bytes_per_token / (bases + pool) / 2**30,
                         "measured_tpot_s": measured.get((pool, n, batch)) if bases == 1 else None})
    return rows


if __name__ == "__main__":  # python -m bench.costmodel RESULT.json: the fit and its error on every point
    import json
    import sys
    from pathlib import Path

    fitted = fit(json.loads(Path(sys.argv[1]).read_text()))
    print(" ".join(f"{t}={getattr(fitted, t):.4g}" for t in "abcdefgh"), dict(fitted.fixed))
    for kind, points in (("tpot", fitted.decode_points), ("ttft", fitted.prefill_points)):
        for p in points:
            print(f"{kind} pool={p.pool} n={p.context} B={p.batch} measured={p.measured_s * 1e3:.3f} ms "
                  f"model={p.predicted_s * 1e3:.3f} ms error={p.rel_error:+.1%}")
