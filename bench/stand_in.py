"""A stand-in for `fapool serve`'s streaming `/generate` that paces its tokens by the clock, not a
model: `python -m bench.serve --stand-in` measures the benchmark client's own ceiling on the machine
it runs on, to set beside what it measures of a real server.

The pace is the real server's under load: the first token `FIRST_S` after the request, then the
rest in chunks of `CHUNK_TOKENS` every `CHUNK_S` (2 ms a token, SSE events gathered per chunk as
serve/sse.py does at 64 streams). With no client cost, 64 streams of 128 tokens, twice, take
2 x (0.05 + 4 x 0.064) s: 26,800 tokens/s.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

FIRST_S, CHUNK_TOKENS, CHUNK_S = 0.05, 32, 0.064


async def generate(request: web.Request) -> web.StreamResponse:
    n = int((await request.json())["max_tokens"])
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(FIRST_S)
    sent = 0
    while sent < n:
        k = 1 if sent == 0 else min(CHUNK_TOKENS, n - sent)
        await resp.write("".join(
            f"data: {json.dumps({'text': 'a', 'token_ids': [7], 'finish_reason': 'length' if sent + i + 1 == n else None})}\n\n"
            for i in range(k)).encode())
        sent += k
        if sent < n:
            await asyncio.sleep(CHUNK_S)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _run(port: int) -> None:
    app = web.Application()
    app.router.add_post("/generate", generate)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def start() -> tuple[subprocess.Popen, str]:
    """The stand-in in a child process (its own CPU, as a real server has): (process, its URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.stand_in", str(port)], cwd=root)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the stand-in server did not start") from None
            time.sleep(0.05)


if __name__ == "__main__":
    _run(int(sys.argv[1]))
