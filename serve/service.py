"""The ingress's view of the cluster: routes requests to base actors, streams their tokens back,
records metrics, and keeps the pool snapshot that `/pool`, `/metrics` and the dashboard read."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray

from actors.cluster import connect, get_or_create_controller
from actors.config import ClusterConfig
from actors.messages import GenerateRequest, TokenEvent
from fapool.config import PRESETS
from fapool.sampling import SamplingParams
from fapool.tokenizer import Tokenizer, load_tokenizer
from fapool.weights import load_model_config
from serve.errors import APIError
from serve.metrics import Metrics, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    max_inflight: int = 1024  # requests in flight in this ingress before 429
    request_timeout_s: float = 600.0
    max_body_bytes: int = 8 << 20
    snapshot_max_age_s: float = 0.5


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class InferenceService:
    def __init__(self, cfg: ClusterConfig, limits: ServeLimits = ServeLimits()) -> None:
        self.cfg, self.limits = cfg, limits
        connect()
        self.controller = get_or_create_controller(cfg)
        self.bases = ray.get(self.controller.get_bases.remote())
        info = ray.get(self.controller.get_base_info.remote())[0]
        self.max_model_len = info["max_model_len"]
        model = cfg.engine.model
        self.model_name = model if model in PRESETS else model.rstrip("/").split("/")[-1]
        model_cfg = PRESETS[model] if model in PRESETS else load_model_config(model)
        self.tokenizer: Tokenizer = load_tokenizer(model, model_cfg)
        self.metrics = Metrics(lambda: self._snap)
        self._snap = Snapshot()
        self._snap_lock = asyncio.Lock()
        self._inflight_by_base = [0] * len(self.bases)
        self._next = 0

    # ---- generation -----------------------------------------------------------------------
    async def open_stream(self, prompt: str | None, prompt_token_ids: list[int] | None,
                          params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Start a request and wait for its first event, so refusals surface as HTTP errors
        before any response is sent. Returns the stream, first event included."""
        if sum(self._inflight_by_base) >= self.limits.max_inflight:
            raise APIError(429, "too many requests in flight; retry later", "overloaded",
                           headers={"Retry-After": "1"})
        req = GenerateRequest(f"req-{uuid.uuid4().hex}", params, prompt,
                              tuple(prompt_token_ids) if prompt_token_ids is not None else None)
        events = self._events(req)
        first = await events.__anext__()

        async def chained() -> AsyncIterator[TokenEvent]:
            yield first
            async for ev in events:
                yield ev

        return chained()

    async def complete(self, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams) -> Finished:
        text, ids, last = [], [], None
        async for ev in await self.open_stream(prompt, prompt_token_ids, params):
            text.append(ev.text)
            ids += ev.token_ids
            last = ev
        assert last is not None and last.finish_reason is not None
        return Finished("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def _events(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        b = self._pick_base()
        base = self.bases[b]
        self._inflight_by_base[b] += 1
        gen = base.generate.options(num_returns="streaming").remote(req)
        t0 = time.monotonic()
        deadline = t0 + self.limits.request_timeout_s
        first_s = last_s = None
        done = False
        try:
            while True:
                try:
                    ref = await asyncio.wait_for(gen.__anext__(), timeout=max(deadline - time.monotonic(), 0.001))
                    batch: tuple[TokenEvent, ...] = await ref
                except StopAsyncIteration:
                    raise APIError(500, "the base actor ended the stream early", "internal") from None
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request took longer than {self.limits.request_timeout_s:.0f}s",
                                   "timeout") from None
                for ev in batch:
                    if ev.finish_reason == "error":
                        done = True
                        raise _to_api_error(ev)
                    now = time.monotonic()
                    if ev.token_ids:
                        first_s = first_s or now
                        last_s = now
                    done = ev.finish_reason is not None
                    if done:
                        tpot = (last_s - first_s) / (ev.completion_tokens - 1) if ev.completion_tokens > 1 else None
                        self.metrics.observe_request(first_s - t0 if first_s else None, tpot, now - t0,
                                                     ev.prompt_tokens, ev.completion_tokens)
                    yield ev
                    if done:
                        return
        finally:
            self._inflight_by_base[b] -= 1
            if not done:  # the client went away or timed out: stop generating, free the KV now
                base.abort.remote(req.request_id)
                try:
                    ray.cancel(gen)
                except Exception:  # noqa: BLE001 - already finished
                    pass

    def _pick_base(self) -> int:
        """The base with the fewest requests from this ingress; round-robin among equals."""
        n = len(self.bases)
        order = [(self._next + i) % n for i in range(n)]
        self._next = (self._next + 1) % n
        return min(order, key=lambda i: self._inflight_by_base[i])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes its own special tokens (BOS included).
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- pool snapshot --------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        if time.time() - self._snap.time_s < self.limits.snapshot_max_age_s:
            return self._snap
        async with self._snap_lock:
            if time.time() - self._snap.time_s >= self.limits.snapshot_max_age_s:
                status, counts, stats = await asyncio.gather(
                    self.controller.status.remote(), self.controller.scale_counts_total.remote(),
                    asyncio.gather(*(b.stats.remote() for b in self.bases)))
                snap = Snapshot()
                snap.status, snap.scale_counts = status, counts
                snap.running = sum(s.running for s in stats)
                snap.waiting = sum(s.waiting for s in stats)
                snap.time_s = time.time()
                self._snap = snap
        return self._snap

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(b.stats.remote() for b in self.bases)), timeout=5)
            return True
        except Exception:  # noqa: BLE001 - a base that cannot answer is not ready
            return False

    async def pool_json(self) -> dict[str, Any]:
        snap = await self.snapshot()
        st = snap.status
        pol = self.cfg.policy
        contexts = list(st.contexts) if st else []
        return {
            "time_s": snap.time_s, "size": st.size if st else 0, "target": st.target if st else 0,
            "epoch": st.epoch if st else 0, "capacity": st.capacity if st else 0, "max_pool": pol.max_pool,
            "members": list(st.members) if st else [], "draining": list(st.draining) if st else [],
            "standby": st.standby if st else 0,
            "curve": str(pol.curve), "cooldown_s": pol.cooldown_s,
            "longest_context": st.longest_context if st else 0, "contexts": contexts,
            "requests_running": snap.running, "requests_waiting": snap.waiting,
            "latency": self.metrics.window.summary(),
            "events": [e.__dict__ for e in (st.events if st else ())][::-1][:100][::-1],
        }


# The replica's service. FastAPI's app object is copied into the Serve replica, so routes find the
# service through this module rather than through `app.state`.
_current: InferenceService | None = None
_guard_settings: tuple[str | None, int] = (None, ServeLimits().max_body_bytes)


def set_current(service: InferenceService, api_key: str | None) -> None:
    global _current, _guard_settings
    _current, _guard_settings = service, (api_key, service.limits.max_body_bytes)


def current() -> InferenceService:
    if _current is None:
        raise APIError(503, "the server is starting; retry shortly", "not_ready")
    return _current


def guard_settings() -> tuple[str | None, int]:
    return _guard_settings


def _to_api_error(ev: TokenEvent) -> APIError:
    if ev.error_type == "overloaded":
        return APIError(429, ev.error or "overloaded", "overloaded", headers={"Retry-After": "1"})
    if ev.error_type == "invalid_request":
        return APIError(400, ev.error or "invalid request", "invalid_request")
    return APIError(500, ev.error or "internal error", "internal")
