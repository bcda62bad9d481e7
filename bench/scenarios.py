"""Benchmark scenarios against a running cluster: prefill (TTFT), decode (TPOT) with its phase
breakdown, a batch too large for one GPU, and the pool's scale-up time."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.cluster import Cluster
from fapool.config import EngineConfig, ModelConfig
from fapool.policy import PolicyConfig, PoolCurve
from fapool.sampling import SamplingParams


@dataclass
class Bench:
    cluster: Cluster
    cfg: ModelConfig
    seed: int = 0
    prefill_budget: int = EngineConfig().max_prefill_tokens  # prompt tokens per engine step

    @property
    def base(self):
        return self.cluster.bases[0]

    def prompt(self, n: int) -> list[int]:
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, min(self.cfg.vocab_size, 256), (n,), generator=g).tolist()

    def run(self, prompts: list[list[int]], max_tokens: int) -> float:
        """Run requests concurrently to the end; returns the wall time."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        errors: list[BaseException] = []

        def one(p: list[int]) -> None:
            try:
                self.cluster.generate(None, params, prompt_token_ids=p)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    def steps(self) -> list[Any]:
        return ray.get(self.base.step_log.remote(clear=True))

    def member_stats(self) -> list[dict]:
        st = self.cluster.status()
        handles = [ray.get(self.cluster.controller.member_handle.remote(m)) for m in st.members]
        return ray.get([h.stats.remote() for h in handles])

    def set_pool(self, size: int, standby: int = 0, cooldown_s: float = 3600.0) -> None:
        """Every request uses exactly `size` members (curve 1:size); the long cooldown keeps the
        pool at that size between requests."""
        curve = PoolCurve(((1, size),))
        ray.get(self.cluster.controller.reconfigure.remote(PolicyConfig(curve, size, cooldown_s), standby))

    def wait_size(self, size: int, timeout_s: float = 300.0) -> None:
        wait_until(lambda: self.cluster.status().size == size, f"the pool to reach {size} members", timeout_s)

    # ---- scenarios ------------------------------------------------------------------------
    def prefill(self, pool: int, n: int, repeats: int = 2) -> dict:
        """TTFT of one n-token prompt alone: the sum of its prefill steps (a prompt over the
        engine's prefill budget is prefilled a chunk a step), best of `repeats`."""
        best: dict | None = None
        for _ in range(repeats):
            self.steps()
            t0 = time.perf_counter()
            self.run([self.prompt(n)], 1)
            wall = time.perf_counter() - t0
            pre = [s for s in self.steps() if s.kind == "prefill"]
            if sum(s.num_tokens for s in pre) != n:
                raise RuntimeError(f"the {n}-token prompt's prefill steps hold {sum(s.num_tokens for s in pre)} "
                                   "tokens; another request shared the base")
            phases: dict[str, float] = {}
            for s in pre:
                for name, sec in s.phases:
                    phases[name] = phases.get(name, 0.0) + sec
            r = {"pool": pool, "context": n, "batch": 1, "ttft_s": sum(s.wall_s for s in pre), "client_s": wall,
                 "chunks": len(pre), "phases": phases, "pooled": max(s.num_pooled for s in pre)}
            if best is None or r["ttft_s"] < best["ttft_s"]:
                best = r | {"client_s": min(wall, best["client_s"]) if best else wall}
            elif wall < best["client_s"]:
                best["client_s"] = wall
        assert best is not None, "repeats >= 1"
        return best

    def decode(self, pool: int, n: int, batch: int, steps: int) -> dict:
        self.steps()
        before = self.member_stats() if pool else []
        # Prompts are prefilled a chunk a step while the first ones already decode, and they reach
        # the base at slightly different times: give every sequence room to outlast the others'
        # arrival and prefill (more on a second try), so the whole batch decodes together.
        dec = []
        for slack in (16, 256):
            self.run([self.prompt(n) for _ in range(batch)],
                     steps + 1 + slack + batch * (-(-n // self.prefill_budget) + 2))
            dec = [s for s in self.steps() if s.kind == "decode" and s.num_seqs == batch]
            if dec:
                break
        after = self.member_stats() if pool else []
        if not dec:
            raise RuntimeError(f"no decode step ran the whole batch of {batch} at {n} tokens")
        walls = [s.wall_s for s in dec]
        tpot = statistics.median(walls)
        phases: dict[str, float] = {}
        for s in dec:
            for name, sec in s.phases:
                phases[name] = phases.get(name, 0.0) + sec / len(dec)
        member_attn = _member_phase_per_step(before, after, "decode")
        return {"pool": pool, "context": n, "batch": batch, "tpot_s": tpot, "tps": batch / tpot,
                "steps": len(dec), "pooled": max(s.num_pooled for s in dec), "phases": phases,
                "member_attention_s": member_attn}

    def oversized(self, pool: int, n: int, batch: int, steps: int) -> dict:
        self.steps()
        wall = self.run([self.prompt(n) for _ in range(batch)], steps)
        log = self.steps()
        dec = [s for s in log if s.kind == "decode"]
        decode_s = sum(s.wall_s for s in dec)
        return {"pool": pool, "context": n, "batch": batch, "wall_s": wall,
                "max_concurrent": max((s.num_seqs for s in dec), default=0),
                "decode_tps": batch * (steps - 1) / decode_s if decode_s else 0.0,
                "e2e_tps": batch * steps / wall}

    def scaleup(self, size: int, n: int, standby: int) -> dict:
        """Seconds from a request's arrival to its first pooled step, growing 0 -> size."""
        self.steps()
        self.set_pool(size, standby)
        before = self.cluster.status()
        t0 = time.time()
        self.run([self.prompt(n)], 1)
        first = next(s for s in self.steps() if s.num_pooled > 0)
        ups = [e for e in self.cluster.status().events if e.direction == "up" and e.time_s >= t0]
        return {"members": size, "standby": standby, "seconds": first.time_s - t0,
                "size_before": before.size, "standby_before": before.standby,
                "scale_event_s": ups[0].time_s - t0 if ups else None}


def wait_until(pred, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _member_phase_per_step(before: list[dict], after: list[dict], kind: str) -> float | None:
    """The slowest member's attention seconds per `kind` step over the scenario."""
    b = {m["member_id"]: m for m in before}
    per = []
    for m in after:
        prev = b.get(m["member_id"], {})
        steps = m.get(f"{kind}_steps", 0) - prev.get(f"{kind}_steps", 0)
        if steps > 0:
            per.append((m.get(f"{kind}_attention", 0.0) - prev.get(f"{kind}_attention", 0.0)) / steps)
    return max(per) if per else None
