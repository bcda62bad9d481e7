"""The HTTP half of `python -m bench.peer`: `fapool serve` and `vllm serve`, one after the other on
the same GPU, each driven by bench.serve's aiohttp client streaming `/v1/completions` (token-id
prompts, greedy, ignore_eos, tokens counted from `usage`).

Both serve the same model directory (bench/peer_vllm.py's model_dir): the preset's config.json and a
word-level tokenizer.json, every id one word, so every token streams as text from both; FA Pool
reads random safetensors weights from it, vLLM draws its own (--load-format dummy). The paper
preset's own byte tokenizer gives most random ids no text, which an OpenAI stream does not send.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import serve as client
from fapool.config import PRESETS

KEY = "peer-bench"


def wait_ready(url: str, proc: subprocess.Popen, log: Path, limit_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready in {limit_s:.0f} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Ctrl-C to the server, then its process group killed; back once the GPU's memory is free
    again (the next server sizes its KV cache from it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(60 if shutil.which("nvidia-smi") else 0):
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True).stdout.split()
        if not used or int(used[0]) < 2048:
            return
        time.sleep(1)


def server(which: str, model: Path, port: int, out: Path, vllm_path: str, device: str) -> subprocess.Popen:
    env = dict(os.environ, FAPOOL_API_KEY=KEY, PYTHONUNBUFFERED="1")
    if which == "fapool":
        cmd = [sys.executable, "-m", "serve.cli", "serve", "--model", str(model), "--device", device,
               "--port", str(port), "--max-pool", "0"]
    else:
        env.update(PYTHONPATH=vllm_path, VLLM_USE_FLASHINFER_SAMPLER="0")
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--load-format", "dummy",
               "--served-model-name", model.name, "--port", str(port), "--host", "127.0.0.1", "--api-key", KEY,
               "--max-model-len", "131072", "--no-enable-prefix-caching"]
    log = out / f"{which}-serve.log"
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def measure(which: str, url: str, concurrency: list[int], requests: int, prompt: int, out_tokens: int,
            stall_long: int) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    r: dict = {"loads": []}
    # Warm: one small load first (the servers' first requests, the client's connections), not kept.
    asyncio.run(client.load(url, 16, 16, prompt, out_tokens, headers, seed=1))
    for c in concurrency:
        ld = asyncio.run(client.load(url, c, max(requests, c), prompt, out_tokens, headers, seed=10 + c))
        ld.pop("timeline")
        r["loads"].append(ld)
        print(which, json.dumps(ld), flush=True)
    if stall_long:
        r["stall"] = asyncio.run(client.stall(url, 8, 2000, stall_long, headers, seed=2))
        print(which, json.dumps(r["stall"]), flush=True)
    return r


def run(preset: str, out: Path, work: Path, concurrency: list[int], requests: int, prompt: int, out_tokens: int,
        stall_long: int, vllm_path: str, engines: list[str], device: str) -> dict:
    from bench.peer_vllm import model_dir

    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    model = model_dir(cfg, work / preset, tokenizer=True, weights="fapool" in engines)
    client.ROUTE[0], client.MODEL[0] = "completions", model.name
    client.VOCAB[0] = min(cfg.vocab_size, 30000)
    result = {"model_dir_s": time.perf_counter() - t0, "requests": requests, "prompt_tokens": prompt,
              "max_tokens": out_tokens, "route": "/v1/completions"}
    for which, port in (("fapool", 8000), ("vllm", 8001)):
        if which not in engines:
            continue
        proc = server(which, model, port, out, vllm_path, device)
        try:
            url = f"http://127.0.0.1:{port}"
            ready = wait_ready(url + ("/ready" if which == "fapool" else "/health"), proc,
                               out / f"{which}-serve.log", 300)
            print(f"{which} serve ready in {ready:.0f} s", flush=True)
            result[which] = {"ready_s": ready, **measure(which, url, concurrency, requests, prompt, out_tokens, stall_long)}
        finally:
            stop(proc)
    return result
