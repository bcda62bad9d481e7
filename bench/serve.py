"""`python -m bench.serve`: drive a running `fapool serve` over HTTP, as vLLM's benchmark_serving does.

    fapool serve --model paper --device cuda &
    python -m bench.serve --url http://127.0.0.1:8000 --concurrency 64 --requests 128 \
        --prompt-tokens 1000 --max-tokens 128 --stall --out $OUT

Streaming `/generate` with random prompt ids (below the served model's `vocab_size`, which
`/v1/models` reports), greedy, `ignore_eos`; a run in which any request fails exits 1 and says
why. Reports output tokens/s and TTFT / TPOT / end-to-end p50 and p99 at the given concurrency;
with `--stall`, the largest gap between two tokens of running streams while a long prompt
arrives, and that prompt's TTFT against
its TTFT alone; with `--ttft`, a first request right after `/ready` against the same repeated, and
prompt lengths never seen before against a repeated length. Prints a table last; writes JSON.

The client is aiohttp, as in vLLM's benchmark. `--stand-in` runs the load against a stand-in
server that streams at a fixed pace (bench/stand_in.py): the client's own ceiling. On this
project's 2-core CPU machine, 64 streams of 128 tokens against it measured 22,200-23,800 tokens/s
and a 63-70 ms mean TTFT (the pace allows 26,800 and 50 ms); the httpx client used before
2026-12-02, against the same stand-in, 8,900-12,000 tokens/s and 256-388 ms: that client, not
only the server, set the earlier figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.docs import put_section


@dataclass
class Stream:
    sent_s: float
    sent_wall_s: float  # time.time(), to line up with a server's step log (bench.steplog --raw)
    token_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def pct(xs: list[float], q: float) -> float | None:
    """None where nothing was measured: JSON has no NaN, and a run with failures stops anyway."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def ms(x: float | None) -> float | None:
    return None if x is None else 1e3 * x


# "completions": stream `/v1/completions` (OpenAI-shaped, served by FA Pool and vLLM alike) with
# MODEL[0] as the model name, and count the tokens from its `usage`; times are then per event.
ROUTE = ["generate"]
MODEL = ["paper"]


def _body(ids: list[int], max_tokens: int) -> tuple[str, dict]:
    if ROUTE[0] == "completions":
        return "/v1/completions", {"model": MODEL[0], "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return "/generate", {"prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                         "stream": True}


async def one(client: aiohttp.ClientSession, url: str, ids: list[int], max_tokens: int, headers: dict,
              on_token=None) -> Stream:
    route, body = _body(ids, max_tokens)
    st = Stream(time.perf_counter(), time.time())
    async with client.post(url + route, json=body, headers=headers) as r:
        if r.status != 200:
            st.error = f"{r.status}: {(await r.read())[:200]!r}"
            return st
        async for raw in r.content:  # one line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                st.error = ev["error"]["message"]
                continue
            if "choices" in ev:  # /v1/completions: an event with text; the count comes with usage
                if ev.get("usage"):
                    st.tokens = ev["usage"]["completion_tokens"]
                if any(c.get("text") for c in ev["choices"]):
                    st.token_s.append(time.perf_counter())
                    if on_token is not None:
                        on_token(st.token_s[-1])
                continue
            n = len(ev.get("token_ids", ()))
            if n:
                now = time.perf_counter()
                st.token_s += [now] * n
                st.tokens += n
                if on_token is not None:
                    on_token(now)
    return st


def session(connections: int = 16) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


VOCAB = [30000]  # prompt ids are drawn from [3, VOCAB): the served model's vocab_size (main() asks)


async def served_vocab(url: str, headers: dict) -> int:
    """The served model's vocabulary, from `/v1/models` (its card's vocab_size)."""
    async with session() as client, client.get(url + "/v1/models", headers=headers) as r:
        if r.status != 200:
            raise Failed(f"GET {url}/v1/models answered {r.status}: {(await r.read())[:200]!r}")
        card = (await r.json())["data"][0]
    if not card.get("vocab_size"):
        raise Failed(f"{url}/v1/models reports no vocab_size; pass --vocab")
    return int(card["vocab_size"])


class Failed(RuntimeError):
    """The benchmark cannot give a true number: it says why and exits 1."""


def prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, VOCAB[0]) for _ in range(n)]


async def load(url: str, concurrency: int, requests: int, prompt_tokens: int, max_tokens: int,
               headers: dict, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [prompt(prompt_tokens, rng) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    async with session(concurrency + 8) as client:
        async def run(p: list[int]) -> Stream:
            async with sem:
                return await one(client, url, p, max_tokens, headers)

        t0 = time.perf_counter()
        streams = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t0
    ok = [s for s in streams if s.error is None and s.tokens and s.token_s]
    ttft = [s.token_s[0] - s.sent_s for s in ok]
    tpot = [(s.token_s[-1] - s.token_s[0]) / (s.tokens - 1) for s in ok if s.tokens > 1]
    e2e = [s.token_s[-1] - s.sent_s for s in ok]
    out = sum(s.tokens for s in ok)
    return {"concurrency": concurrency, "requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "ok": len(ok), "errors": [s.error for s in streams if s.error][:5], "wall_s": wall,
            "output_tokens_per_s": out / wall,
            "ttft_ms": {"p50": ms(pct(ttft, 0.5)), "p99": ms(pct(ttft, 0.99)),
                        "mean": ms(statistics.fmean(ttft) if ttft else None)},
            "tpot_ms": {"p50": ms(pct(tpot, 0.5)), "p99": ms(pct(tpot, 0.99))},
            "e2e_ms": {"p50": ms(pct(e2e, 0.5)), "p99": ms(pct(e2e, 0.99))},
            # Per request: sent (wall clock), first and last token (seconds after sent).
            "timeline": [(round(s.sent_wall_s, 4), round(s.token_s[0] - s.sent_s, 4), round(s.token_s[-1] - s.sent_s, 4))
                         for s in ok]}


async def ttft_alone(client: aiohttp.ClientSession, url: str, ids: list[int], headers: dict) -> float:
    st = await one(client, url, ids, 1, headers)
    if st.error:
        raise RuntimeError(st.error)
    return st.token_s[0] - st.sent_s


async def stall(url: str, streams: int, stream_tokens: int, long_tokens: int, headers: dict, seed: int) -> dict:
    rng = random.Random(seed)
    long_ids = prompt(long_tokens, rng)
    async with session() as client:
        alone = await ttft_alone(client, url, long_ids, headers)
        last: dict[int, float] = {}
        gaps: list[float] = []
        before: list[float] = []  # the same streams' gaps just before the long prompt: their TPOT
        window = [False]

        def tick(i: int):
            def on(now: float) -> None:
                if i in last:
                    (gaps if window[0] else before).append(now - last[i])
                last[i] = now
            return on

        tasks = [asyncio.create_task(one(client, url, prompt(stream_tokens, rng), 4000, headers, tick(i)))
                 for i in range(streams)]
        while len(last) < streams:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        before.clear()
        await asyncio.sleep(0.5)
        window[0] = True
        t0 = time.perf_counter()
        with_streams = await ttft_alone(client, url, long_ids[::-1], headers)  # same length, new tokens
        window[0] = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": streams, "stream_tokens": stream_tokens, "long_tokens": long_tokens,
            "max_gap_ms": ms(max(gaps, default=None)), "gaps_seen": len(gaps),
            "gap_before_p50_ms": ms(pct(before, 0.5)), "gap_during_p50_ms": ms(pct(gaps, 0.5)),
            "long_ttft_alone_ms": 1e3 * alone, "long_ttft_with_streams_ms": 1e3 * with_streams,
            "window_s": time.perf_counter() - t0}


async def ttft_table(url: str, headers: dict, seed: int, n: int = 2000) -> dict:
    rng = random.Random(seed)
    async with session() as client:
        # As a client would: poll /ready, then send. This also pays the client's own first-use
        # costs (imports, the connection), which are not the server's.
        async with client.get(url + "/ready", headers=headers) as r:
            r.raise_for_status()
        ids = prompt(n, rng)
        first = await ttft_alone(client, url, ids, headers)
        repeated = [await ttft_alone(client, url, prompt(n, rng), headers) for _ in range(3)]
        new = [await ttft_alone(client, url, prompt(n + 1 + 7 * i, rng), headers) for i in range(3)]
    return {"tokens": n, "first_ms": 1e3 * first, "repeated_ms": [1e3 * x for x in repeated],
            "new_length_ms": [1e3 * x for x in new]}


START, END = "<!-- bench.serve start -->", "<!-- bench.serve end -->"


def markdown(paths: list[Path]) -> str:
    """docs/benchmarks.md's HTTP section: one row per result file, side by side."""
    rows = [START, "## HTTP serving (`bench.serve`)", "",
            "| result | note | output tok/s | TPOT p50 / p99 ms | TTFT p50 / p99 ms | first after /ready vs repeated ms "
            "| new length ms | stall: max gap ms, long TTFT vs alone |", "|---|---|---|---|---|---|---|---|"]
    for p in paths:
        r = json.loads(p.read_text())
        ld, t, s = r["load"], r.get("ttft"), r.get("stall")
        first = f"{t['first_ms']:.0f} vs {statistics.median(t['repeated_ms']):.0f}" if t else "-"
        new = f"{statistics.median(t['new_length_ms']):.0f}" if t else "-"
        stall = (f"{s['max_gap_ms']:.0f}; {s['long_ttft_with_streams_ms']:.0f} vs {s['long_ttft_alone_ms']:.0f}"
                 if s else "-")
        note = r.get("note", "") + ("" if r.get("client") == "aiohttp" else " [httpx client]")
        rows.append(f"| `{p.name}` | {note} | {ld['output_tokens_per_s']:.0f} | "
                    f"{ld['tpot_ms']['p50']:.2f} / {ld['tpot_ms']['p99']:.2f} | {ld['ttft_ms']['p50']:.0f} / "
                    f"{ld['ttft_ms']['p99']:.0f} | {first} | {new} | {stall} |")
    r0 = json.loads(paths[0].read_text())
    ld = r0["load"]
    rows += ["", f"Card: {r0.get('card', '?')}; command: `{r0.get('command', 'python -m bench.serve')}`. Load: "
             f"concurrency {ld['concurrency']}, {ld['requests']} requests of {ld['prompt_tokens']} prompt tokens, "
             f"{ld['max_tokens']} out, greedy. Stall: 8 streams decoding while a long prompt arrives. The "
             "first-after-/ready figure of these runs includes the benchmark client's own first use "
             "(bench.serve now polls /ready with its client before timing). Rows marked [httpx client] were "
             "measured with an httpx client that, against a clock-paced stand-in server on a 2-core machine, "
             "itself capped at 8,900-12,000 tokens/s with a 256-388 ms mean TTFT; the aiohttp client that "
             "replaced it reaches 22,200-23,800 tokens/s and 63-70 ms there, and 24,086 tokens/s and 62 ms on "
             "the 16-core H200 host (`python -m bench.serve --stand-in`, "
             "`serve-paper-H200-s7-client-ceiling.json`). On that host the old client was not what capped the "
             "server: session 6's code measured 7,416 and 8,937 tokens/s with aiohttp (`-s7-proxy`) against "
             "10,041 and 8,763 with httpx."]
    return "\n".join(rows + ["", END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--stand-in", action="store_true",
                   help="load a clock-paced stand-in server instead (bench/stand_in.py): the client's own ceiling")
    p.add_argument("--api-key", default=os.environ.get("FAPOOL_API_KEY"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ttft", action="store_true", help="first request after /ready, new lengths vs repeated")
    p.add_argument("--stall", action="store_true", help="streams decoding while a long prompt arrives")
    p.add_argument("--stall-long-tokens", type=int, default=120000)
    p.add_argument("--stall-stream-tokens", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=None,
                   help="prompt ids are drawn below this (default: the server's vocab_size, from /v1/models)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--name", default="serve")
    p.add_argument("--render", type=Path, nargs="*", default=None,
                   help="write these results' section into --doc and stop")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args(argv)
    if args.render:
        put_section(args.doc, START, END, markdown(args.render))
        return 0
    stand_in = None
    if args.stand_in:
        from bench import stand_in as stand_in_mod

        stand_in, args.url = stand_in_mod.start()
        args.ttft = args.stall = False  # the stand-in has no model: only the load means anything
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    result: dict = {"url": args.url, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "client": "aiohttp",
                    "stand_in": args.stand_in}
    try:
        VOCAB[0] = args.vocab or (30000 if args.stand_in else asyncio.run(served_vocab(args.url, headers)))
        if args.ttft:  # first: the first request after /ready is part of it
            result["ttft"] = asyncio.run(ttft_table(args.url, headers, args.seed))
            print(json.dumps(result["ttft"]), flush=True)
        result["load"] = asyncio.run(load(args.url, args.concurrency, args.requests, args.prompt_tokens,
                                          args.max_tokens, headers, args.seed))
        print(json.dumps({k: v for k, v in result["load"].items() if k != "timeline"}), flush=True)
        if result["load"]["ok"] < args.requests:
            ld = result["load"]
            raise Failed(f"{args.requests - ld['ok']} of {args.requests} requests failed; first errors: {ld['errors']}")
        if args.stall:
            result["stall"] = asyncio.run(stall(args.url, 8, args.stall_stream_tokens, args.stall_long_tokens,
                                                headers, args.seed + 1))
            print(json.dumps(result["stall"]), flush=True)
    except (Failed, aiohttp.ClientError) as e:
        result["failed"] = str(e) or type(e).__name__
        print(f"bench.serve: FAILED: {result['failed']}", file=sys.stderr, flush=True)
    finally:
        if stand_in is not None:
            stand_in.kill()
            stand_in.wait()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    if "failed" in result:
        return 1
    ld = result["load"]
    print(f"\nconcurrency {ld['concurrency']}, {ld['requests']} requests of {ld['prompt_tokens']} tokens, "
          f"{ld['max_tokens']} out: {ld['output_tokens_per_s']:.0f} output tokens/s, "
          f"TTFT p50 {f(ld['ttft_ms']['p50'])} / p99 {f(ld['ttft_ms']['p99'])} / mean {f(ld['ttft_ms'].get('mean'))} ms, "
          f"TPOT p50 {f(ld['tpot_ms']['p50'], 2)} / p99 {f(ld['tpot_ms']['p99'], 2)} ms ({ld['ok']} ok)")
    if "ttft" in result:
        t = result["ttft"]
        print(f"TTFT {t['tokens']} tokens: first after /ready {t['first_ms']:.0f} ms, repeated "
              f"{statistics.median(t['repeated_ms']):.0f} ms, new lengths {statistics.median(t['new_length_ms']):.0f} ms")
    if "stall" in result:
        s = result["stall"]
        print(f"stall: {s['streams']} streams, {s['long_tokens']}-token prompt: max gap {f(s['max_gap_ms'])} ms; "
              f"its TTFT {s['long_ttft_with_streams_ms']:.0f} ms vs {s['long_ttft_alone_ms']:.0f} ms alone")
    return 0


def f(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
