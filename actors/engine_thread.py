"""A base's engine thread: commands from the Ray calls run between two steps, then one step.

The Ray calls (on the actor's asyncio loop) change nothing of the engine or its executor
themselves: they queue a command, a closure over the executor's or this thread's methods (`post`
when no answer is wanted, `ask` for one), and the thread runs it before its next step. So a
command never lands amid a step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from actors.config import ClusterConfig
from actors.messages import BaseReport, BaseStats, GenerateRequest, StepRecord
from actors.streams import Streams
from fapool.engine import LLMEngine
from fapool.errors import ErrorType
from fapool.pool.pooled_attention import PooledAttention
from fapool.pool.transport import PoolFailure
from fapool.sequence import RequestOutput
from fapool.stats import EngineStep

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5
T = TypeVar("T")
Command = Callable[[], Any]


def _noop() -> None:
    """Wakes the thread (to see the stop flag)."""


class EngineThread:
    def __init__(self, base_id: int, cfg: ClusterConfig, engine: LLMEngine, executor: PooledAttention,
                 streams: Streams) -> None:
        self.base_id, self.cfg = base_id, cfg
        self.engine, self.executor = engine, executor
        self._streams = streams
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._controller: Any = None
        self._last_report: tuple = ()
        self._engine_stats = engine.stats()
        self._last_report_s = 0.0
        self.steps: deque[StepRecord] = deque(maxlen=20000)
        self.stats = self._make_stats()  # published by this thread, read by Ray calls without waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"engine-b{base_id}")
        self._thread.start()

    # ---- from the Ray calls ---------------------------------------------------------------
    def post(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    async def ask(self, cmd: Callable[[], T]) -> T:
        """Run `cmd` on the engine thread between two steps; returns its result (or raises)."""
        fut: Future = Future()

        def run() -> None:
            # The caller's await may have been cancelled (a client gave up): then nobody wants
            # the answer, and setting it would raise InvalidStateError.
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(cmd())
            except Exception as e:  # noqa: BLE001 - hand the error to the caller
                fut.set_exception(e)

        self._inbox.put(run)
        return await asyncio.wrap_future(fut)

    def set_controller(self, controller: Any) -> None:
        self._controller = controller
        self._last_report = ()  # report at once to the new controller

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(_noop)

    # ---- commands (run on this thread) ----------------------------------------------------
    def add(self, req: GenerateRequest) -> None:
        if self._engine_stats.waiting >= self.cfg.max_waiting_per_base:
            self._streams.emit([RequestOutput.failed(req.request_id, "the queue is full; retry later",
                                                     ErrorType.OVERLOADED)])
            return
        try:
            ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else None
            self.engine.add_request(req.prompt, req.params, prompt_token_ids=ids, request_id=req.request_id)
        except ValueError as e:
            self._streams.emit([RequestOutput.failed(req.request_id, str(e), ErrorType.INVALID_REQUEST)])

    def abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._emit(out)

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        idle = True
        while not self._stop.is_set():
            try:
                idle = self._iterate(idle)
            except Exception:  # noqa: BLE001 - nothing may end this thread: it is the whole engine
                log.exception("base %d: engine loop", self.base_id)
                idle = True
        self.executor.retire_plane()

    def _iterate(self, idle: bool) -> bool:
        """Commands, then one step; returns whether the engine is idle."""
        # Block for commands when nothing can run (idle, or every request waits for the pool).
        self._drain_inbox(block=idle or not self.engine.has_unfinished())
        idle = False
        if self.engine.has_unfinished():
            try:
                step = self._timed_step()
            except PoolFailure as e:
                log.warning("base %d: %s; recomputing pooled requests", self.base_id, e)
                self._recover()
                return False
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("base %d: step failed", self.base_id)
                self._fail_all(f"internal error: {e}")
                return False
            finally:
                self.stats = self._make_stats()
            self._streams.emit(step.outputs)
            idle = step.report is None and not step.outputs
        self._report()
        return idle

    def _timed_step(self) -> EngineStep:
        t_wall, t0 = time.time(), time.perf_counter()
        step = self.engine.step()  # ends with sampled tokens on the host: the GPU work is done
        wall = time.perf_counter() - t0
        r = step.report  # None when nothing new ran
        if r is not None:
            ex = self.executor
            contexts = [s.end for s in r.batch.slices]
            # KV parts per sequence (the base's and its members'): what the SLO policy's fit reads.
            parts = [len(ex.pooled[s.seq_id].member_ids) + 1 if s.seq_id in ex.pooled else 1 for s in r.batch.slices]
            self.steps.append(StepRecord(
                t_wall, wall, r.kind, r.num_seqs, r.num_tokens, ex.stats().step_pooled,
                max(contexts, default=0),
                tuple(sorted({**dict(r.phases), "host_launch": r.launch_s}.items()))
                if ex.timer.enabled else (),
                sum(c / p for c, p in zip(contexts, parts)), sum(contexts), max(parts, default=1) - 1,
            ))
        return step

    def _drain_inbox(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: Command) -> None:
        try:
            cmd()
        except Exception:  # noqa: BLE001 - one bad command must not stop the engine
            log.exception("base %d: command %r failed", self.base_id, cmd)
        self.stats = self._make_stats()

    def _make_stats(self) -> BaseStats:
        es = self._engine_stats = self.engine.stats()
        ps = self.executor.stats()
        return BaseStats(self.base_id, ps.epoch, es.running, es.waiting, ps.pooled, ps.pooled_total,
                         es.kv_used_tokens, es.kv_capacity_tokens, es.contexts, es, ps.members_kv)

    def _recover(self) -> None:
        """A member was lost mid-step: drop the group and prefill pooled requests again."""
        self.engine.recompute(self.executor.abandon())
        self.stats = self._make_stats()
        self._report(force=True, failed=True)

    def _fail_all(self, message: str) -> None:
        for out in self.engine.abort_all():
            self._emit(out, error=message)

    def _emit(self, out: RequestOutput, error: str | None = None) -> None:
        if error is not None:  # a fault around the request (a failed step), not the request's own
            out = dataclasses.replace(out, finish_reason="error", error=error, error_type=ErrorType.INTERNAL)
        self._streams.emit([out])

    def _report(self, force: bool = False, failed: bool = False) -> None:
        """Tell the controller the contexts in flight when they change (fire and forget)."""
        ex, es = self.executor, self._engine_stats
        per_member = tuple(sorted(ex.seqs_per_member().items()))
        # Contexts grow by one token a decode step; the controller hears of that at most every
        # REPORT_EVERY_S (a Ray call a step would cost the token loop), of anything else at once.
        state = (es.request_ids, per_member)
        now = time.monotonic()
        if not force and state == self._last_report and now - self._last_report_s < REPORT_EVERY_S:
            return
        self._last_report, self._last_report_s = state, now
        if self._controller is None:  # no controller yet (or a bare test): nothing to tell
            return
        try:
            contexts = tuple(sorted(es.contexts, reverse=True))
            self._controller.report.remote(BaseReport(self.base_id, ex.epoch, contexts, per_member, failed))
        except Exception:  # noqa: BLE001 - a dead controller: its successor calls set_controller
            log.debug("base %d: report failed", self.base_id, exc_info=True)
