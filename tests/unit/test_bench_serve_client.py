"""bench.serve's client against a stand-in server over real HTTP (aiohttp on a local port): it counts
every token of every stream, times the first token after the request went out, and reports a
refused request as an error rather than as tokens."""
import asyncio
import json
import socket

import pytest
from aiohttp import web

from bench import serve as bench_serve

FIRST_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if len(body["prompt_token_ids"]) > 50:
        return web.json_response({"error": {"message": "prompt too long", "type": "invalid_request_error"}},
                                 status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(FIRST_S)
    n = body["max_tokens"]
    for i in range(n):  # one event a token, two or three to a chunk
        ev = {"text": "a", "token_ids": [7], "finish_reason": "length" if i == n - 1 else None}
        await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
        if i % 3 == 2:
            await asyncio.sleep(0.002)
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def run_against_stand_in(prompt_tokens: int) -> dict:
    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await bench_serve.load(f"http://127.0.0.1:{port}", concurrency=4, requests=10,
                                      prompt_tokens=prompt_tokens, max_tokens=12, headers={}, seed=0)
    finally:
        await runner.cleanup()


def test_every_token_is_counted_and_ttft_is_from_the_send():
    r = asyncio.run(run_against_stand_in(prompt_tokens=20))
    assert r["ok"] == 10 and not r["errors"]
    assert r["output_tokens_per_s"] * r["wall_s"] == pytest.approx(10 * 12)
    assert FIRST_S * 1e3 <= r["ttft_ms"]["p50"] < FIRST_S * 1e3 + 500
    assert len(r["timeline"]) == 10 and all(first <= last for _, first, last in r["timeline"])


def test_a_refused_request_is_an_error_not_tokens():
    r = asyncio.run(run_against_stand_in(prompt_tokens=60))
    assert r["ok"] == 0 and r["output_tokens_per_s"] == 0
    assert r["errors"] and r["errors"][0].startswith("400")


def test_the_stand_in_run_measures_the_client_alone(tmp_path):
    """`--stand-in`: the load against a clock-paced server in a child process, written like any run."""
    assert bench_serve.main(["--stand-in", "--concurrency", "4", "--requests", "8", "--max-tokens", "40",
                             "--out", str(tmp_path), "--name", "ceiling"]) == 0
    r = json.loads((tmp_path / "ceiling.json").read_text())
    assert r["stand_in"] and r["load"]["ok"] == 8
    assert r["load"]["output_tokens_per_s"] * r["load"]["wall_s"] == pytest.approx(8 * 40)
    # 40 tokens: the first after 50 ms, then 32 and 7 in chunks 64 ms apart.
    assert r["load"]["ttft_ms"]["p50"] >= 50 and r["load"]["e2e_ms"]["p50"] >= 50 + 64
