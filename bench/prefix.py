"""`python bench/prefix.py`: prefix caching, FA Pool beside vLLM, in-engine, one GPU.

    python -m bench.prefix --model paper --vllm /tmp/vllm --out $OUT      # one H200, about 7 minutes
    python -m bench.prefix --model tiny --device cpu --small --engines fapool-off,fapool-on  # here

Three workloads, each on an engine with prefix caching on and one with it off, FA Pool's
`LLMEngine` and vLLM's (`enable_prefix_caching`), the same token-id prompts, greedy, ignore_eos:
- long document: TTFT of a new question (64 tokens) over the same 16K and 64K document, against
  the TTFT of a question over a document never seen (medians of `--reps`);
- multi-turn chat: 64 conversations at once (a shared 512-token system prompt, 4 turns of a
  100-token question and a 128-token answer, each turn's prompt the whole history): tokens/s;
- no reuse: 256 unique 1K-token prompts, 128 tokens out, 64 in flight: tokens/s with the cache
  on against off, the cache's own cost (the goal: at most 2%). The run-to-run spread of one engine
  is larger than that, so FA Pool's cost is also measured with both engines in one process, the
  same prompts run on each in turn for `--cost-rounds` rounds (alternating which goes first): the
  median of the rounds' on/off ratios.
The goal for the first: a cached TTFT at most 10% of the uncached.

vLLM runs in a process of its own with PYTHONPATH set to `--vllm` alone (its packages; not Ray's
site, whose FastAPI differs), so this file's vLLM side imports nothing but the standard library
and vLLM. Prints a table last; writes prefix.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = 64
ENGINES = ("vllm-off", "vllm-on", "fapool-off", "fapool-on")  # vLLM first: before this process holds GPU memory


# ---- the workloads (both engines, the same ids: stdlib random only) ----------------------------
def ids(n: int, seed: int, vocab: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(300, min(vocab, 30000)) for _ in range(n)]


def drive(eng, clients: list, max_tokens: int) -> dict:
    """Closed loop: each client's next prompt goes in when its previous request ends. A client is
    a function (previous output ids or None) -> its next prompt, or None when it is done."""
    live: dict[str, tuple[int, float, list[int]]] = {}
    ttfts, generated = [], 0

    def start(c: int, prev: list[int] | None) -> None:
        prompt = clients[c](prev)
        if prompt is not None:
            live[eng.add(prompt, max_tokens)] = (c, time.perf_counter(), [])

    t0 = time.perf_counter()
    for c in range(len(clients)):
        start(c, None)
    while live:
        for rid, new, finished in eng.step():
            c, t_add, out = live[rid]
            if new and not out:
                ttfts.append(time.perf_counter() - t_add)
            out += new
            generated += len(new)
            if finished:
                del live[rid]
                start(c, out)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": generated / wall, "wall_s": wall, "generated": generated,
            "ttft_p50_ms": 1e3 * statistics.median(ttfts) if ttfts else None}


def ttft(eng, prompt: list[int]) -> float:
    return drive(eng, [lambda prev, p=prompt: p if prev is None else None], 1)["ttft_p50_ms"]


def long_document(eng, sizes: list[int], reps: int, vocab: int) -> dict:
    out = {}
    for n in sizes:
        doc = ids(n, 1000 + n, vocab)
        ttft(eng, doc + ids(QUESTION, 1, vocab))  # the document read once
        cached = [ttft(eng, doc + ids(QUESTION, 10 + r, vocab)) for r in range(reps)]
        fresh = [ttft(eng, ids(n, 2000 + n + r, vocab) + ids(QUESTION, 20 + r, vocab)) for r in range(reps)]
        out[str(n)] = {"cached_ms": statistics.median(cached), "uncached_ms": statistics.median(fresh),
                       "cached_all_ms": cached, "uncached_all_ms": fresh}
    return out


def chat(eng, convs: int, turns: int, system: int, question: int, answer: int, vocab: int, seed: int) -> dict:
    sys_prompt = ids(system, seed, vocab)

    def client(c: int):
        state = {"turn": 0, "history": list(sys_prompt)}

        def next_prompt(prev: list[int] | None) -> list[int] | None:
            if prev is not None:
                state["history"] += prev  # the answer joins the history
            if state["turn"] == turns:
                return None
            state["history"] += ids(question, seed + 1000 * c + state["turn"], vocab)
            state["turn"] += 1
            return list(state["history"])
        return next_prompt

    return {**drive(eng, [client(c) for c in range(convs)], answer), "conversations": convs}


def no_reuse(eng, requests: int, concurrency: int, prompt: int, out: int, vocab: int, seed: int) -> dict:
    left = iter(range(requests))

    def client(_c: int):
        return lambda prev: (ids(prompt, seed + i, vocab) if (i := next(left, None)) is not None else None)
    return drive(eng, [client(c) for c in range(concurrency)], out)


def measure(eng, a: argparse.Namespace, vocab: int) -> dict:
    warm = min(2048, a.max_model_len // 2)
    drive(eng, [lambda prev: ids(warm, 7, vocab) if prev is None else None], 8)  # warm
    r = {"long_document": long_document(eng, a.doc_tokens, a.reps, vocab)}
    r["chat"] = chat(eng, a.convs, a.turns, a.system, a.question, a.answer, vocab, seed=50_000)
    # The best of two (new prompts each): the cost sought is a few percent, about the run-to-run spread.
    runs = [no_reuse(eng, a.requests, a.concurrency, a.prompt, a.out_tokens, vocab, seed=90_000 + 10_000 * k)
            for k in range(2)]
    r["no_reuse"] = {**max(runs, key=lambda x: x["tokens_per_s"]), "all_tokens_per_s": [x["tokens_per_s"] for x in runs]}
    return r


def interleaved_cost(a: argparse.Namespace) -> dict:
    """FA Pool's no-reuse tokens/s with the cache off and on, two engines in this process, the
    same prompts on each in turn. The 'on' engine's cache fills with idle pages in the first
    round, so later rounds pay for eviction too."""
    kv = a.kv_tokens or 393_216
    engines = {p: FapoolEngine(argparse.Namespace(**{**vars(a), "kv_tokens": kv}), p) for p in (False, True)}
    for eng in engines.values():
        drive(eng, [lambda prev: ids(1024, 7, eng.vocab) if prev is None else None], 8)  # warm
    rounds = []
    for k in range(a.cost_rounds):
        seed, r = 200_000 + 10_000 * k, {}
        for p in ((False, True) if k % 2 == 0 else (True, False)):
            eng = engines[p]
            r[p] = no_reuse(eng, a.requests, a.concurrency, a.prompt, a.out_tokens, eng.vocab, seed)["tokens_per_s"]
        rounds.append({"off_tokens_per_s": r[False], "on_tokens_per_s": r[True], "on_over_off": r[True] / r[False]})
    return {"rounds": rounds, "kv_tokens": kv, "median_on_over_off": statistics.median(x["on_over_off"] for x in rounds),
            "cached_tokens_at_end": engines[True].engine.stats().prefix_cached_tokens}


# ---- the engines ------------------------------------------------------------------------------
class FapoolEngine:
    def __init__(self, a: argparse.Namespace, prefix: bool) -> None:
        from fapool import EngineConfig, LLMEngine
        from fapool.sampling import SamplingParams

        self.sp = SamplingParams
        cfg = EngineConfig(model=a.model, device=a.device, max_num_seqs=a.concurrency, prefix_caching=prefix,
                           max_prefill_tokens=a.chunk, max_model_len=a.max_model_len,
                           kv_capacity_tokens=a.kv_tokens)
        self.engine = LLMEngine(cfg)
        self.vocab = self.engine.loaded.config.vocab_size

    def add(self, prompt: list[int], max_tokens: int) -> str:
        sp = self.sp(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return self.engine.add_request(None, sp, prompt_token_ids=prompt)

    def step(self) -> list[tuple[str, tuple[int, ...], bool]]:
        return [(o.request_id, o.new_token_ids, o.finished) for o in self.engine.step().outputs]

    def extra(self) -> dict:
        c = self.engine.stats()
        return {"prefix_queries": c.prefix_queries, "prefix_hits": c.prefix_hits,
                "kernel": getattr(self.engine.kernel, "name", None), "page_size": c.kv_page_size}


class VllmEngine:
    """vLLM's LLMEngine, its engine core in this process, behind the same add/step."""

    def __init__(self, a: argparse.Namespace, prefix: bool, hf_config: dict, path: Path) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        from vllm import LLM

        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf_config))
        self.llm = LLM(model=str(path), load_format="dummy", skip_tokenizer_init=True, dtype=hf_config["torch_dtype"],
                       max_num_seqs=a.concurrency, max_num_batched_tokens=a.chunk, max_model_len=a.max_model_len,
                       enable_prefix_caching=prefix, gpu_memory_utilization=0.85, seed=0)
        self.engine = self.llm.llm_engine
        self.vocab = hf_config["vocab_size"]
        self._n = 0

    def add(self, prompt: list[int], max_tokens: int) -> str:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rid = f"r{self._n}"
        self._n += 1
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
        try:
            from vllm.inputs.engine import tokens_input
            prompt_in = tokens_input(list(prompt))
        except ImportError:
            prompt_in = {"prompt_token_ids": list(prompt)}
        self.engine.add_request(rid, prompt_in, sp)
        return rid

    def step(self) -> list[tuple[str, tuple[int, ...], bool]]:
        return [(o.request_id, tuple(o.outputs[0].token_ids), o.finished) for o in self.engine.step()]

    def extra(self) -> dict:
        import vllm

        return {"vllm": vllm.__version__}


def run_side(a: argparse.Namespace, side: str, prefix: bool, cfg_json: str | None) -> dict:
    t0 = time.perf_counter()
    if side == "vllm":
        eng = VllmEngine(a, prefix, json.loads(Path(cfg_json).read_text()), Path(tempfile.mkdtemp()) / "model")
    else:
        eng = FapoolEngine(a, prefix)
    start_s = time.perf_counter() - t0
    r = measure(eng, a, eng.vocab)
    return {"engine": side, "prefix_caching": prefix, "start_s": start_s, **r, **eng.extra()}


def vllm_child(a: argparse.Namespace, prefix: bool, work: Path) -> dict | None:
    """One vLLM engine in a process of its own, vLLM's packages alone on its path."""
    cfg, res = work / "hf_config.json", work / f"vllm_{int(prefix)}.json"
    from bench.peer_vllm import hf_config
    from fapool.config import PRESETS

    cfg.write_text(json.dumps(hf_config(PRESETS[a.model])))
    # By path, not -m: the child's path is vLLM's packages and nothing of this tree but this file.
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "vllm", "--child-prefix", str(int(prefix)),
            "--child-config", str(cfg), "--child-out", str(res), *a.passthrough]
    env = {**os.environ, "PYTHONPATH": a.vllm, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    proc = subprocess.run(argv, env=env)
    if proc.returncode != 0 or not res.exists():
        print(f"vLLM (prefix caching {'on' if prefix else 'off'}) failed: exit {proc.returncode}", flush=True)
        return None
    return json.loads(res.read_text())


# ---- the report -------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    cols = [(f"{r['engine']} {'on' if r['prefix_caching'] else 'off'}", r) for r in results]
    rows = []
    for n in results[0]["long_document"]:
        rows.append((f"TTFT {int(n) / 1024:g}K doc, uncached ms", [r["long_document"][n]["uncached_ms"] for _, r in cols]))
        rows.append((f"TTFT {int(n) / 1024:g}K doc, new question ms", [r["long_document"][n]["cached_ms"] for _, r in cols]))
        rows.append(("  cached / uncached", [r["long_document"][n]["cached_ms"] / r["long_document"][n]["uncached_ms"]
                                              for _, r in cols]))
    rows.append((f"chat x{results[0]['chat']['conversations']} tokens/s", [r["chat"]["tokens_per_s"] for _, r in cols]))
    rows.append(("no reuse tokens/s", [r["no_reuse"]["tokens_per_s"] for _, r in cols]))
    w = max(len(n) for n, _ in rows) + 2
    lines = ["".ljust(w) + "".join(name.rjust(13) for name, _ in cols)]
    for name, vals in rows:
        lines.append(name.ljust(w) + "".join((f"{v:.3f}" if v < 10 else f"{v:,.1f}").rjust(13) for v in vals))
    for eng in ("fapool", "vllm"):
        on = [r for _, r in cols if r["engine"] == eng and r["prefix_caching"]]
        off = [r for _, r in cols if r["engine"] == eng and not r["prefix_caching"]]
        if on and off:
            cost = 1 - on[0]["no_reuse"]["tokens_per_s"] / off[0]["no_reuse"]["tokens_per_s"]
            lines.append(f"{eng}: the cache's cost with no reuse {100 * cost:+.1f}% (goal <= 2%)")
    return "\n".join(lines)


def cost_table(c: dict) -> str:
    lines = [f"FA Pool, no reuse, both engines in one process, {len(c['rounds'])} rounds:"]
    lines += [f"  round {i}: off {r['off_tokens_per_s']:,.0f}  on {r['on_tokens_per_s']:,.0f} tokens/s  "
              f"on/off {r['on_over_off']:.4f}" for i, r in enumerate(c["rounds"])]
    lines.append(f"the cache's cost with no reuse, median of rounds: {100 * (1 - c['median_on_over_off']):+.1f}% (goal <= 2%)")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="paper", help="a preset: paper, llama8b, tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--vllm", default="/tmp/vllm", help="vLLM's unpacked packages (bundle-vllm.sh)")
    p.add_argument("--engines", default=",".join(ENGINES), help="which of " + ", ".join(ENGINES))
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where prefix.json goes")
    p.add_argument("--small", action="store_true", help="sizes for a CPU smoke run")
    for name, default in (("reps", 3), ("convs", 64), ("turns", 4), ("system", 512), ("question", 100),
                          ("answer", 128), ("requests", 256), ("concurrency", 64), ("prompt", 1024),
                          ("out-tokens", 128), ("chunk", 2048), ("max-model-len", 65536 + 1024),
                          ("kv-tokens", None)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--doc-tokens", default="16384,65536", help="document lengths, comma-separated")
    p.add_argument("--cost-rounds", type=int, default=4,
                   help="rounds of FA Pool's interleaved no-reuse cost (both engines in one process); 0: none")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-prefix", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if not x.startswith("--child")]
    if a.small:  # a smoke run of every path in a minute or two on a CPU
        a.doc_tokens, a.reps, a.convs, a.turns, a.system, a.question, a.answer = "512,1024", 2, 4, 2, 64, 20, 8
        a.requests, a.concurrency, a.prompt, a.out_tokens, a.chunk, a.max_model_len = 8, 4, 64, 8, 256, 2048
        a.kv_tokens = a.kv_tokens or 16384
    a.doc_tokens = [int(x) for x in str(a.doc_tokens).split(",")]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.child:
        Path(a.child_out).write_text(json.dumps(run_side(a, a.child, bool(a.child_prefix), a.child_config)))
        return
    chosen = a.engines.split(",")
    bad = [e for e in chosen if e not in ENGINES]
    if bad:
        raise SystemExit(f"--engines: {bad[0]!r} is none of {', '.join(ENGINES)}")
    results, work = [], Path(tempfile.mkdtemp())
    for name in (e for e in ENGINES if e in chosen):
        side, prefix = name.split("-")[0], name.endswith("-on")
        if side == "vllm":
            r = vllm_child(a, prefix, work)
            results += [r] if r else []
            continue
        import gc

        import torch

        results.append(run_side(a, "fapool", prefix, None))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    import torch
    cost = interleaved_cost(a) if a.cost_rounds > 0 and any(e.startswith("fapool") for e in chosen) else None
    results.sort(key=lambda r: (r["engine"] != "fapool", r["prefix_caching"]))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": a.model,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "command": " ".join(["python bench/prefix.py", *(argv if argv is not None else sys.argv[1:])]),
              "results": results, "interleaved_cost": cost}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix.json").write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, {a.model}, {report['commit']}; JSON in {out / 'prefix.json'}")
    if results:
        print(table(results))
    if cost:
        print(cost_table(cost))


if __name__ == "__main__":
    if "--child" in sys.argv:  # run by path: bench/ itself is no package root for vLLM's imports
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    main()
