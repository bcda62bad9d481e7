"""Seeded request traces. Each generator's parameters go into the result file beside its numbers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MAX_CONTEXT = 65536


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: int
    output: int


@dataclass(frozen=True)
class Workload:
    """Prompt lengths: lognormal(median, sigma) clipped to [min_prompt, 64K - output], with a
    fraction `long_frac` drawn log-uniform from [long_min, 64K]. Outputs: lognormal around
    `output_median`. Arrivals: Poisson; `burst_*` adds groups of long prompts every
    `burst_every_s`; `diurnal` modulates the rate as a half sine over the trace (low, peak, low)."""

    name: str
    prompt_median: int
    prompt_sigma: float
    long_frac: float
    long_min: int
    output_median: int = 256
    output_sigma: float = 0.6
    burst_every_s: float = 0.0
    burst_size: int = 0
    burst_min: int = 32768
    diurnal: bool = False
    min_prompt: int = 16

    def prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.clip(rng.lognormal(math.log(self.output_median), self.output_sigma, n), 16, 2048).astype(int)
        p = rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, n)
        long = rng.random(n) < self.long_frac
        p[long] = np.exp(rng.uniform(math.log(self.long_min), math.log(MAX_CONTEXT), long.sum()))
        return np.clip(p, self.min_prompt, MAX_CONTEXT - out).astype(int), out

    def params(self) -> dict:
        return asdict(self)


WORKLOADS = {
    "chat": Workload("chat", prompt_median=600, prompt_sigma=1.0, long_frac=0.02, long_min=8192),
    "long-document": Workload("long-document", prompt_median=6000, prompt_sigma=0.8, long_frac=0.30,
                              long_min=16384),
    "bursty": Workload("bursty", prompt_median=600, prompt_sigma=1.0, long_frac=0.0, long_min=8192,
                       burst_every_s=180.0, burst_size=24, burst_min=32768),
    "diurnal": Workload("diurnal", prompt_median=600, prompt_sigma=1.0, long_frac=0.04, long_min=8192,
                        diurnal=True),
}


def generate(w: Workload, rate_per_s: float, duration_s: float, seed: int) -> list[Request]:
    """Poisson arrivals at `rate_per_s` (the mean over the trace when `diurnal`)."""
    rng = np.random.default_rng(seed)
    if w.diurnal:  # thinning: peak 2x the mean of a half sine (mean of sin over [0, pi] is 2/pi)
        peak = rate_per_s * math.pi / 2
        t = np.cumsum(rng.exponential(1 / peak, int(peak * duration_s * 1.2) + 10))
        t = t[t < duration_s]
        t = t[rng.random(len(t)) < np.sin(math.pi * t / duration_s)]
    else:
        t = np.cumsum(rng.exponential(1 / rate_per_s, int(rate_per_s * duration_s * 1.2) + 10))
        t = t[t < duration_s]
    prompts, outs = w.prompts(rng, len(t))
    reqs = [Request(float(a), int(p), int(o)) for a, p, o in zip(t, prompts, outs)]
    if w.burst_every_s:
        for start in np.arange(w.burst_every_s / 2, duration_s, w.burst_every_s):
            at = start + rng.uniform(0, 5.0, w.burst_size)
            p = np.exp(rng.uniform(math.log(w.burst_min), math.log(MAX_CONTEXT - 512), w.burst_size))
            o = np.clip(rng.lognormal(math.log(w.output_median), w.output_sigma, w.burst_size), 16, 512)
            reqs += [Request(float(a), int(x), int(y)) for a, x, y in zip(at, p, o)]
    return sorted(reqs, key=lambda r: r.arrival_s)


def mean_shape(w: Workload, seed: int = 0, n: int = 20000) -> tuple[float, float, float]:
    """(mean prompt, mean output, mean context while decoding) of the workload's background mix."""
    p, o = w.prompts(np.random.default_rng(seed), n)
    return float(p.mean()), float(o.mean()), float((p + o / 2).mean())
