"""`BaseActor`: one base GPU. Holds the model's weights, runs the engine loop, streams tokens.

Ray calls (requests, aborts, epoch changes) run on the actor's asyncio loop; the engine runs on
its own thread, so a long step never blocks a call. The two meet in `_inbox` (commands to the
engine thread) and per-request asyncio queues (events back to the callers).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from typing import Any, AsyncIterator

import ray

from actors.config import ClusterConfig
from actors.messages import BaseReport, BaseStats, GenerateRequest, StepRecord, TokenEvent
from actors.streams import Streams, drain, event_of
from fapool.attention import select_kernel
from fapool.engine import LLMEngine
from fapool.policy import PolicyConfig
from fapool.pool.membership import EpochSpec
from fapool.pool.pooled_attention import PooledAttention, PoolFailure
from fapool.pool.transport import LOOPBACK, DataPlane
from fapool.sequence import RequestOutput

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5


class BaseActor:
    def __init__(self, base_id: int, cfg: ClusterConfig) -> None:
        self.base_id = base_id
        self.cfg = cfg
        self.executor: PooledAttention | None = None

        def make_executor(loaded, cache):
            kernel = select_kernel(loaded.device, cfg.engine.attention_kernel, dtype=loaded.dtype)
            self.executor = PooledAttention(
                loaded.config, cache, kernel, cfg.policy, cfg.num_base_actors, cfg.pool_wait_s, cfg.profile,
                base_id,
            )
            return self.executor

        self.engine = LLMEngine(cfg.engine, executor_factory=make_executor)
        self.node_ip = ray.util.get_node_ip_address()
        self.incarnation = uuid.uuid4().hex  # a restarted actor answers `ping` with a new one
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams = Streams()
        self._pending_epoch: tuple[EpochSpec, Any, str] | None = None
        self._controller = None
        self._last_report: tuple = ()
        self._last_report_s = 0.0
        self._steps: deque[StepRecord] = deque(maxlen=20000)
        self._stats = self._make_stats()  # published by the engine thread, read without waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"engine-b{base_id}")
        self._thread.start()

    # ---- Ray-facing calls -----------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        loaded = self.engine.loaded
        return {
            "base_id": self.base_id,
            "model_config": loaded.config,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device_type": loaded.device.type,
            "max_model_len": self.engine.max_model_len,
            "max_seq_tokens": self.executor.max_seq_tokens(),
            "node_ip": self.node_ip,
        }

    async def generate(self, req: GenerateRequest) -> AsyncIterator[tuple[TokenEvent, ...]]:
        """Stream a request's steps: each item is one or more `TokenEvent`s (one per engine step);
        the last event has `finish_reason`."""
        rid = req.request_id
        if rid in self._streams:
            yield (TokenEvent(rid, (), "", "error", error=f"request_id {rid!r} is already in flight",
                              error_type="invalid_request"),)
            return
        events = self._streams.open(rid)
        finished = False
        try:
            self._inbox.put(("add", req))
            while True:
                batch = drain(await events.get(), events)
                finished = batch[-1].finish_reason is not None
                yield batch
                if finished:
                    return
                if len(self._streams) > self.cfg.stream_batching_above:
                    # Under load, let a few steps' tokens gather: one Ray item (and one HTTP chunk)
                    # then carries several, and the per-item cost no longer caps the token rate.
                    await asyncio.sleep(self.cfg.stream_interval_s)
        finally:
            self._streams.close(rid)
            if not finished:  # the caller went away: free its KV now
                self._inbox.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def ping(self) -> tuple[int, str]:
        """Answered on the event loop, never behind an engine step: (base id, incarnation)."""
        return self.base_id, self.incarnation

    async def stats(self) -> BaseStats:
        """As of the latest engine step: a long prefill never delays the answer."""
        return self._stats

    async def set_controller(self, controller: Any) -> None:
        """The controller that hears this base's reports (it calls this when it (re)starts)."""
        self._controller = controller
        self._last_report = ()  # report at once to the new controller

    async def set_capacity(self, capacity: int) -> None:
        """How many members the cluster can give: a long prompt waits only for a pool that can come."""
        self._inbox.put(("capacity", capacity))

    async def set_policy(self, policy: PolicyConfig) -> None:
        await self._ask("policy", policy)

    async def set_draining(self, member_ids: frozenset[int]) -> dict[int, int]:
        """Stop placing sequences on these members; returns live pooled sequences per member."""
        return await self._ask("draining", member_ids)

    async def seqs_per_member(self) -> dict[int, int]:
        return await self._ask("seqs_per_member")

    async def prepare_epoch(self, spec: EpochSpec) -> tuple[str, int]:
        """Open the rendezvous store of a new group; members join it, then `commit_epoch`."""
        # Loopback when every member shares this node: the group is then unreachable from outside.
        host = LOOPBACK if all(m.node_ip == self.node_ip for m in spec.members) else self.node_ip
        store = DataPlane.host_store(host, self.cfg.data_plane_timeout_s) if spec.members else None
        self._pending_epoch = (spec, store, host)
        return host, (store.port if store is not None else 0)

    async def commit_epoch(self, epoch: int) -> list[str]:
        """Switch the engine to the prepared group between two steps; returns recomputed requests."""
        return await self._ask("epoch", epoch)

    async def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("noop", None))

    async def _ask(self, kind: str, arg: Any = None) -> Any:
        fut: Future = Future()
        self._inbox.put((kind, (arg, fut)))
        return await asyncio.wrap_future(fut)

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        idle = True
        while not self._stop.is_set():
            try:
                idle = self._iterate(idle)
            except Exception:  # noqa: BLE001 - nothing may end this thread: it is the whole engine
                log.exception("base %d: engine loop", self.base_id)
                idle = True
        if self.executor is not None:
            self.executor.retire_plane()

    def _iterate(self, idle: bool) -> bool:
        """Commands, then one step; returns whether the engine is idle."""
        # Block for commands when nothing can run (idle, or every request waits for the pool).
        self._drain_inbox(block=idle or not self.engine.has_unfinished())
        idle = False
        if self.engine.has_unfinished():
            try:
                outputs = self._timed_step()
            except PoolFailure as e:
                log.warning("base %d: %s; recomputing pooled requests", self.base_id, e)
                self._recover()
                return False
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("base %d: step failed", self.base_id)
                self._fail_all(f"internal error: {e}")
                return False
            finally:
                self._stats = self._make_stats()
            self._streams.emit([event_of(out) for out in outputs])
            idle = self.engine.last_batch is None
        self._report()
        return idle

    def _timed_step(self) -> list[RequestOutput]:
        t_wall, t0 = time.time(), time.perf_counter()
        outputs = self.engine.step()  # ends with sampled tokens on the host: the GPU work is done
        wall = time.perf_counter() - t0
        batch = self.engine.last_batch  # None when nothing could run
        if batch is not None:
            ex = self.executor
            contexts = [s.end for s in batch.slices]
            self._steps.append(StepRecord(
                t_wall, wall, batch.kind, len(batch.slices), batch.num_tokens,
                ex.step_pooled, max(contexts, default=0),
                tuple(sorted({**ex.timer.collect(), "host_launch": self.engine.last_launch_s}.items()))
                if ex.timer.enabled else (),
            ))
        return outputs

    async def step_log(self, clear: bool = False) -> list[StepRecord]:
        """The latest steps' timings (and phases, with profiling on)."""
        log_ = list(self._steps)
        if clear:
            self._steps.clear()
        return log_

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, arg: Any) -> None:
        try:
            self._command(kind, arg)
        except Exception:  # noqa: BLE001 - one bad command must not stop the engine
            log.exception("base %d: command %r failed", self.base_id, kind)
        self._stats = self._make_stats()

    def _command(self, kind: str, arg: Any) -> None:
        ex = self.executor
        assert ex is not None
        if kind == "add":
            self._add(arg)
        elif kind == "abort":
            out = self.engine.abort(arg)
            if out is not None:
                self._emit(out)
        elif kind == "capacity":
            ex.capacity_hint = arg
        elif kind == "noop":
            pass
        else:
            value, fut = arg
            # The caller's await may have been cancelled (a client gave up): then nobody wants
            # the answer, and setting it would raise InvalidStateError.
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(self._answer(kind, value))
            except Exception as e:  # noqa: BLE001 - hand the error to the caller
                fut.set_exception(e)

    def _make_stats(self) -> BaseStats:
        sched, ex = self.engine.scheduler, self.executor
        return BaseStats(self.base_id, ex.spec.epoch, len(sched.running), len(sched.waiting), len(ex.pooled),
                         ex.pooled_total, self.engine.cache.reserved_tokens, self.engine.cache.capacity_tokens,
                         tuple(sched.contexts_in_flight()), self.engine.counters(), ex.placement.usage())

    def _answer(self, kind: str, value: Any) -> Any:
        ex = self.executor
        if kind == "draining":
            ex.spec = EpochSpec(ex.spec.epoch, ex.spec.members, frozenset(value))
            return ex.seqs_per_member()
        if kind == "policy":
            ex.policy = value
            return None
        if kind == "seqs_per_member":
            return ex.seqs_per_member()
        if kind == "epoch":
            return self._switch_epoch(value)
        raise ValueError(f"unknown command {kind!r}")

    def _add(self, req: GenerateRequest) -> None:
        if len(self.engine.scheduler.waiting) >= self.cfg.max_waiting_per_base:
            self._streams.emit([TokenEvent(req.request_id, (), "", "error", error="the queue is full; retry later",
                                               error_type="overloaded")])
            return
        try:
            ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else None
            self.engine.add_request(req.prompt, req.params, prompt_token_ids=ids, request_id=req.request_id)
        except ValueError as e:
            self._streams.emit([TokenEvent(req.request_id, (), "", "error", error=str(e), error_type="invalid_request")])

    def _switch_epoch(self, epoch: int) -> list[str]:
        assert self._pending_epoch is not None and self._pending_epoch[0].epoch == epoch
        spec, store, host = self._pending_epoch
        self._pending_epoch = None
        plane = None
        if spec.members:
            plane = DataPlane.connect(store, host, store.port, f"epoch{epoch}/", 0,
                                      1 + len(spec.members), self.engine.loaded.device, self.cfg.data_plane_timeout_s)
        stale = self.executor.switch_epoch(spec, plane)
        self.engine.recompute(stale)
        return stale

    def _recover(self) -> None:
        """A member was lost mid-step: drop the group and prefill pooled requests again."""
        self.engine.recompute(self.executor.abandon())
        self._report(force=True, failed=True)

    def _fail_all(self, message: str) -> None:
        sched = self.engine.scheduler
        for seq in [*sched.running, *sched.waiting]:
            out = self.engine.abort(seq.request_id)
            if out is not None:
                self._emit(out, error=message)

    def _emit(self, out: RequestOutput, error: str | None = None) -> None:
        self._streams.emit([event_of(out, error)])

    def _report(self, force: bool = False, failed: bool = False) -> None:
        """Tell the controller the contexts in flight when they change (fire and forget)."""
        ex = self.executor
        contexts = tuple(sorted(self.engine.scheduler.contexts_in_flight(), reverse=True))
        per_member = tuple(sorted(ex.seqs_per_member().items()))
        # Contexts grow by one token a decode step; the controller hears of that at most every
        # REPORT_EVERY_S (a Ray call a step would cost the token loop), of anything else at once.
        sched = self.engine.scheduler
        state = (tuple(q.request_id for q in (*sched.running, *sched.waiting)), per_member)
        now = time.monotonic()
        if not force and state == self._last_report and now - self._last_report_s < REPORT_EVERY_S:
            return
        self._last_report, self._last_report_s = state, now
        if self._controller is None:  # no controller yet (or a bare test): nothing to tell
            return
        try:
            self._controller.report.remote(BaseReport(self.base_id, ex.spec.epoch, contexts, per_member, failed))
        except Exception:  # noqa: BLE001 - a dead controller: its successor calls set_controller
            log.debug("base %d: report failed", self.base_id, exc_info=True)
