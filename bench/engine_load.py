"""The HTTP benchmark's load run inside one engine (no Ray, no HTTP), for `python -m bench.engine`:
what the engine alone sustains, the ceiling of `bench.serve`'s figure, against the physical floor."""
from __future__ import annotations

import statistics
import time

import torch

from bench.floors import decode_floor_s, prefill_floor_s
from fapool import LLMEngine, SamplingParams
from fapool.config import PRESETS


def ids(n: int, seed: int, vocab: int) -> list[int]:
    """`n` random prompt ids below `vocab` (and 30,000), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(300, min(vocab, 30000), (n,), generator=g).tolist()


def load(engine: LLMEngine, concurrency: int, requests: int, prompt: int, max_tokens: int, seed: int) -> dict:
    """bench.serve's load without HTTP or Ray: `concurrency` requests in flight, a new one added
    as soon as one finishes (new prompts each), until `requests` have run. What the engine alone
    sustains: the ceiling of the HTTP figure. Per step kind: steps, median wall, tokens a step."""
    vocab = engine.loaded.config.vocab_size
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [ids(prompt, seed + i, vocab) for i in range(requests)]
    kinds: dict[str, list[tuple[float, int]]] = {}
    live, sent, out = set(), 0, 0
    t0 = time.perf_counter()
    while sent < requests or live:
        while sent < requests and len(live) < concurrency:
            live.add(engine.add_request(None, sp, prompt_token_ids=prompts[sent]))
            sent += 1
        s0 = time.perf_counter()
        step = engine.step()
        if step.report is not None:
            kinds.setdefault(step.report.kind, []).append((time.perf_counter() - s0, step.report.num_tokens))
        for o in step.outputs:
            out += len(o.new_token_ids)
            if o.finished:
                live.discard(o.request_id)
    wall = time.perf_counter() - t0
    steps = {k: {"steps": len(v), "wall_ms": 1e3 * statistics.median(w for w, _ in v),
                 "tokens": statistics.median(n for _, n in v), "time_share": sum(w for w, _ in v) / wall}
             for k, v in kinds.items()}
    return {"concurrency": concurrency, "requests": requests, "prompt_tokens": prompt, "max_tokens": max_tokens,
            "wall_s": wall, "output_tokens_per_s": out / wall, "steps": steps}


def load_floor_s(cfg, ld: dict, pr: dict) -> float:
    """The load's GPU work at the physical floor: every prompt's FLOPs at the measured matmul rate,
    then each wave's decode steps (at its mean context) at the copy rate."""
    prefill = ld["requests"] * prefill_floor_s(cfg, ld["prompt_tokens"], 0, pr["matmul_flops_per_s"],
                                               pr["attention_flops_per_s"])
    waves = ld["requests"] / ld["concurrency"]
    step = decode_floor_s(cfg, ld["prompt_tokens"] + ld["max_tokens"] // 2, ld["concurrency"], 0, 2, pr["copy_bytes_per_s"])
    return prefill + waves * ld["max_tokens"] * step


def load_lines(r: dict) -> list[str]:
    """docs/benchmarks.md lines for a result's in-engine loads (none when it has none)."""
    lines: list[str] = []
    for key, what in (("load", "prompt chunks in CUDA graph segments"), ("load_eager_chunks", "prompt chunks eager")):
        if r.get(key):
            ld = r[key]
            st = ld["steps"]
            ceiling = ld["requests"] * ld["max_tokens"] / load_floor_s(PRESETS[r["preset"]], ld, r["probe"])
            lines += ["", f"In-engine load ({what}; bench.serve's shape without Ray or HTTP): {ld['concurrency']} in "
                      f"flight, {ld['requests']} requests of {ld['prompt_tokens']} prompt tokens, {ld['max_tokens']} out: "
                      f"**{ld['output_tokens_per_s']:.0f} output tokens/s**, {ld['output_tokens_per_s'] / ceiling:.0%} of "
                      f"the floor's {ceiling:.0f} (every prompt at the matmul rate, then its decode steps at the copy "
                      f"rate, nothing overlapped); "
                      + "; ".join(f"{k} steps {v['steps']}, median {v['wall_ms']:.2f} ms for {v['tokens']:.0f} tokens"
                                  for k, v in st.items()) + "."]
    return lines
