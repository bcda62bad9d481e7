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

from actors.cluster import Cluster
from actors.config import ClusterConfig
from actors.controller import pool_policy_json
from actors.messages import GenerateRequest
from fapool.config import PRESETS
from fapool.errors import ErrorType
from fapool.sampling import SamplingParams
from fapool.sequence import Completion, RequestOutput
from fapool.tokenizer import Tokenizer, load_tokenizer
from fapool.weights import load_model_config
from serve.errors import APIError
from serve.metrics import Metrics, Snapshot, prefix_cache_summary
from serve.sse import gathering

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    max_inflight: int = 1024  # requests in flight in this ingress before 429
    request_timeout_s: float = 600.0
    max_body_bytes: int = 8 << 20
    snapshot_max_age_s: float = 0.5
    status_timeout_s: float = 1.5  # `/pool` and `/metrics` answer from the last snapshot after this
    stream_chunks_per_s: float = 1000.0  # `--stream-chunks-per-s`: serve/sse.py's gathering


class InferenceService:
    def __init__(self, cfg: ClusterConfig, limits: ServeLimits = ServeLimits(),
                 model_names: tuple[str, ...] = ()) -> None:
        self.cfg, self.limits = cfg, limits
        # This replica owns its cluster: `serve shutdown` or a redeploy ends the replica and with
        # it every actor of the cluster, and a redeploy starts one with the new settings.
        self.cluster = Cluster.start(cfg, name=cluster_prefix(_app_name()) + uuid.uuid4().hex[:8])
        self.supervisor = self.cluster.supervisor
        infos = ray.get(self.cluster.controller.get_base_info.remote())
        self.max_model_len = infos[0]["max_model_len"]
        self.max_seq_tokens = min(i["max_seq_tokens"] for i in infos)
        # The first request through a base pays Ray's streaming set-up and the engine's first
        # request: pay it here, before /ready says yes, so the first client does not.
        warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for b, base in enumerate(self.bases):
            self.cluster.generate(None, warm, prompt_token_ids=[1], base=base)
            self.cluster.feed(b)  # the Ray stream that will carry this replica's requests, opened now
        model = cfg.engine.model
        # The first is the id responses carry; `model` may be any (--served-model-name).
        self.model_names = model_names or (model if model in PRESETS else model.rstrip("/").split("/")[-1],)
        self.model_name = self.model_names[0]
        model_cfg = PRESETS[model] if model in PRESETS else load_model_config(model)
        self.tokenizer: Tokenizer = load_tokenizer(model, model_cfg)
        self.metrics = Metrics(lambda: self._snap)
        self._snap = Snapshot()
        self._snap_lock = asyncio.Lock()
        self._snap_failed_s = 0.0  # when the latest refresh gave up

    @property
    def controller(self) -> Any:
        return self.supervisor.controller

    @property
    def bases(self) -> list[Any]:
        return self.supervisor.bases

    # ---- health and draining --------------------------------------------------------------
    def alive(self) -> bool:
        """Some base can generate (the others may be restarting)."""
        return any(self.supervisor.healthy)

    def draining(self) -> bool:
        """The server is shutting down (SIGTERM or SIGINT to `fapool serve`)."""
        return self.supervisor.drain_deadline_s is not None

    def inflight(self) -> int:
        return self.cluster.inflight()

    # ---- generation -----------------------------------------------------------------------
    async def open_stream(self, prompt: str | None, prompt_token_ids: list[int] | None,
                          params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Start a request and wait for its first event, so refusals surface as HTTP errors
        before any response is sent. Returns the stream, first event included."""
        if self.draining():
            raise APIError(503, "the server is shutting down; retry on another replica", "shutting_down",
                           headers={"Retry-After": "1"})
        if self.cluster.inflight() >= self.limits.max_inflight:
            raise APIError(429, "too many requests in flight; retry later", "overloaded",
                           headers={"Retry-After": "1"})
        req = GenerateRequest(f"req-{uuid.uuid4().hex}", params, prompt,
                              tuple(prompt_token_ids) if prompt_token_ids is not None else None)
        events = self._events(req)
        first = await events.__anext__()

        async def chained() -> AsyncIterator[RequestOutput]:
            try:
                yield first
                async for ev in events:
                    yield ev
            finally:  # closed early (the client left): `_events` ends now and aborts the request
                await events.aclose()

        return chained()

    async def complete(self, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams) -> Completion:
        return Completion.of([ev async for ev in await self.open_stream(prompt, prompt_token_ids, params)])

    async def _events(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        b = self.cluster.pick_base()
        if b is None:
            raise APIError(503, "no base actor can generate right now (restarting); retry shortly",
                           "base_unavailable", headers={"Retry-After": "1"})
        with self.cluster.using(b) as base:
            feed = self.cluster.feed(b)
            events = feed.open(req)
            t0 = time.monotonic()
            first_s = last_s = None
            done, reason = False, "abort"  # a stream left before its end: the client went away
            try:
                while True:
                    ev = await self._next_event(events, t0)
                    if ev.finish_reason == "error":
                        done = True
                        # A refused request (bad value, full queue) never ran: not a finished one.
                        reason = "error" if ErrorType.of(ev.error_type) is ErrorType.INTERNAL else ""
                        raise _to_api_error(ev)
                    now = time.monotonic()
                    if ev.new_token_ids:
                        first_s = first_s or now
                        last_s = now
                    done = ev.finish_reason is not None
                    if done:
                        reason = ev.finish_reason
                        tpot = (last_s - first_s) / (ev.completion_tokens - 1) if ev.completion_tokens > 1 else None
                        self.metrics.observe_request(first_s - t0 if first_s else None, tpot, now - t0,
                                                     ev.prompt_tokens, ev.completion_tokens, ev.queue_s)
                    yield ev
                    if done:
                        return
            except APIError as e:
                # Cut short by the server (timeout, drain) is an abort; a base lost under it, an error.
                reason = reason if done else ("abort" if e.status == 504 or self.draining() else "error")
                raise
            finally:
                feed.close(req.request_id)
                if reason:
                    self.metrics.observe_finish(reason)
                if not done:  # the client went away, timed out or the server drains: free the KV now
                    try:
                        base.abort.remote(req.request_id)
                    except Exception:  # noqa: BLE001 - the base is gone
                        pass

    async def _next_event(self, events: asyncio.Queue, t0: float) -> RequestOutput:
        """The request's next event from its feed, or the error a client should see: 503 when the
        base died (at once) or the server's drain deadline passed, 504 past the request timeout."""
        try:
            item = events.get_nowait()  # a step's events arrive together: most are already here
        except asyncio.QueueEmpty:
            while True:
                # Wake at least every second: a drain can begin while a long prefill runs.
                wait_s = min(t0 + self.limits.request_timeout_s - time.monotonic(), 1.0)
                if (end := self.supervisor.drain_deadline_s) is not None:
                    wait_s = min(wait_s, end - time.time())
                try:
                    item = await asyncio.wait_for(events.get(), timeout=max(wait_s, 0.0))
                    break
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= t0 + self.limits.request_timeout_s:
                    raise APIError(504, f"the request took longer than {self.limits.request_timeout_s:.0f}s",
                                   "timeout")
                if (end := self.supervisor.drain_deadline_s) is not None and time.time() >= end:
                    raise APIError(503, "the server shut down before this request finished; retry it",
                                   "shutting_down")
        if isinstance(item, ray.exceptions.RayActorError):
            log.warning("a base actor died under a request: %s", item)
            raise APIError(503, "the base actor serving this request died; retry it", "base_unavailable",
                           headers={"Retry-After": "1"})
        if isinstance(item, BaseException):
            log.warning("a base's feed ended under a request: %r", item)
            raise APIError(500, "the base actor ended the stream early", "internal")
        return item

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes its own special tokens (BOS included).
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- pool snapshot --------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        """The pool's state, at most `snapshot_max_age_s` old; when the controller or a base
        cannot answer within `status_timeout_s`, the last one (a status call never hangs)."""
        if time.time() - self._snap.time_s < self.limits.snapshot_max_age_s:
            return self._snap
        async with self._snap_lock:
            # A refresh that just ran (and failed: the controller is down) is not tried again at
            # once by those who waited for it, so a status call waits for one attempt at most.
            tried = max(self._snap.time_s, self._snap_failed_s)
            if time.time() - tried >= self.limits.snapshot_max_age_s:
                bases = [b for b, ok in zip(self.bases, self.supervisor.healthy) if ok]
                try:
                    status, counts, stats = await asyncio.wait_for(asyncio.gather(
                        self.controller.status.remote(), self.controller.scale_counts_total.remote(),
                        asyncio.gather(*(b.stats.remote() for b in bases))), self.limits.status_timeout_s)
                except Exception as e:  # noqa: BLE001 - a dead or busy actor: keep the last snapshot
                    log.warning("pool snapshot: %r", e)
                    self._snap_failed_s = time.time()
                    return self._snap
                snap = Snapshot()
                snap.status, snap.scale_counts = status, counts
                snap.running = sum(s.running for s in stats)
                snap.waiting = sum(s.waiting for s in stats)
                snap.bases = list(stats)
                snap.time_s = time.time()
                self._snap = snap
        return self._snap

    def pool_state(self) -> str:
        """The pool's state from the latest snapshot (refreshed in the background when old):
        "recovering" while the controller does not answer, else what it says (PoolStatus.state)."""
        age = time.time() - self._snap.time_s
        if age >= self.limits.snapshot_max_age_s and not self._snap_lock.locked():
            self._refresh = asyncio.get_running_loop().create_task(self.snapshot())  # kept: tasks are weak
        if self._snap.status is None:
            return "starting"
        stale = age > 2 * self.limits.snapshot_max_age_s + self.limits.status_timeout_s
        return "recovering" if stale else self._snap.status.state

    async def ready(self) -> bool:
        """A base can generate and the server is not shutting down; never waits on an engine."""
        return self.alive() and not self.draining()

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
            "prefix_cache": prefix_cache_summary(self.cfg.engine.prefix_caching, snap.bases),
            "events": [e.__dict__ for e in (st.events if st else ())][::-1][:100][::-1],
            **pool_policy_json(pol, st), "state": self.pool_state(),
        }


# The replica's service. FastAPI's app object is copied into the Serve replica, so routes find the
# service through this module rather than through `app.state`.
_current: InferenceService | None = None
_guard_settings: tuple[str | None, int] = (None, ServeLimits().max_body_bytes)


def set_current(service: InferenceService, api_key: str | None) -> None:
    global _current, _guard_settings
    _current, _guard_settings = service, (api_key, service.limits.max_body_bytes)
    gathering.set_rate(service.limits.stream_chunks_per_s)


def current() -> InferenceService:
    if _current is None:
        raise APIError(503, "the server is starting; retry shortly", "not_ready")
    return _current


def guard_settings() -> tuple[str | None, int]:
    return _guard_settings


def cluster_prefix(app: str) -> str:
    """How the clusters of Serve application `app` are named (`fapool serve` drains them by it)."""
    return f"fapool-serve-{app}-"


def _app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a Serve replica (a test builds the service directly)
        return "local"


def _to_api_error(ev: RequestOutput) -> APIError:
    kind = ErrorType.of(ev.error_type)
    if kind is ErrorType.OVERLOADED:
        return APIError(429, ev.error or "overloaded", kind.value, headers={"Retry-After": "1"})
    if kind is ErrorType.INVALID_REQUEST:
        return APIError(400, ev.error or "invalid request", kind.value)
    return APIError(500, ev.error or "internal error", kind.value)
