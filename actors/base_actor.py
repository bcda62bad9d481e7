"""`BaseActor`: one base GPU. Holds the model's weights, runs the engine loop, streams tokens.

Ray calls (requests, aborts, epoch changes) run on the actor's asyncio loop; the engine runs on
its own thread (`actors/engine_thread.py`), so a long step never blocks a call. The two meet in
the thread's command queue (closures over the executor's methods, run between steps) and one
asyncio queue of events per client: a request enters by `submit` and its events leave by its
client's `feed` (`actors/feeds.py`), whoever the client is (the HTTP ingress, `Cluster.generate`).
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from functools import partial
from typing import Any, AsyncIterator

import ray

from actors.config import ClusterConfig
from actors.engine_thread import EngineThread
from actors.messages import BaseStats, GenerateRequest, StepRecord
from actors.streams import Streams, take_waiting
from fapool.attention import select_kernel
from fapool.engine import LLMEngine
from fapool.errors import ErrorType
from fapool.policy import PolicyConfig
from fapool.pool.membership import EpochSpec
from fapool.pool.pooled_attention import PooledAttention
from fapool.pool.transport import LOOPBACK, DataPlane
from fapool.sequence import RequestOutput


# The engine thread releases the GIL around torch ops and takes it back after; while the event
# loop's thread runs Python (streams, Ray calls), a take-back can wait up to Python's switch
# interval (5 ms by default). A short one bounds that wait for an eager step of hundreds of ops.
GIL_SWITCH_INTERVAL_S = 0.0002
MAX_ENDED_FEEDS = 4096  # ended feed ids remembered, so a late `submit` to one starts nothing


class BaseActor:
    def __init__(self, base_id: int, cfg: ClusterConfig) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.base_id = base_id
        self.cfg = cfg
        made: list[PooledAttention] = []

        def make_executor(loaded, cache):
            kernel = select_kernel(loaded.device, cfg.engine.attention_kernel, dtype=loaded.dtype)
            made.append(PooledAttention(
                loaded.config, cache, kernel, cfg.policy, cfg.num_base_actors, cfg.pool_wait_s, cfg.profile,
                base_id,
            ))
            return made[0]

        self.engine = LLMEngine(cfg.engine, executor_factory=make_executor)
        self.executor = made[0]
        self.node_ip = ray.util.get_node_ip_address()
        self.incarnation = uuid.uuid4().hex  # a restarted actor answers `ping` with a new one
        self._streams = Streams()
        self._feeds: dict[str, tuple[asyncio.Queue, set[str]]] = {}  # feed id: its events, its requests
        self._ended_feeds: dict[str, None] = {}  # in the order they ended
        self._pending_epoch: tuple[EpochSpec, Any, str] | None = None
        self._engine = EngineThread(base_id, cfg, self.engine, self.executor, self._streams)

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

    async def feed(self, feed_id: str) -> AsyncIterator[tuple[RequestOutput, ...]]:
        """One client's stream of all the requests it `submit`s with this id (`actors/feeds.py`),
        the one way a request's events leave a base: each item is every event that came since the
        last, of all those requests, in step order. When the client goes away (it cancels the
        stream), its requests still running are aborted."""
        events, live = self._feed(feed_id)
        try:
            while True:
                batch = take_waiting(await events.get(), events)
                for ev in batch:
                    if ev.finish_reason is not None:
                        live.discard(ev.request_id)
                        self._streams.close(ev.request_id)
                yield batch
        finally:
            self._feeds.pop(feed_id, None)
            self._ended_feeds[feed_id] = None
            while len(self._ended_feeds) > MAX_ENDED_FEEDS:  # the oldest have had their last submit
                self._ended_feeds.pop(next(iter(self._ended_feeds)))
            for rid in live:
                self._streams.close(rid)
                self._engine.post(partial(self._engine.abort, rid))

    async def submit(self, feed_id: str, req: GenerateRequest) -> None:
        """Start a request whose events go to feed `feed_id`: the one way a request enters a base."""
        rid = req.request_id
        if feed_id in self._ended_feeds:  # its client is gone: nobody would read the tokens
            return
        events, live = self._feed(feed_id)
        if rid in self._streams:
            events.put_nowait(RequestOutput.failed(rid, f"request_id {rid!r} is already in flight",
                                                   ErrorType.INVALID_REQUEST))
            return
        self._streams.attach(rid, events)
        live.add(rid)
        self._engine.post(partial(self._engine.add, req))

    def _feed(self, feed_id: str) -> tuple[asyncio.Queue, set[str]]:
        # Whichever of `feed` and the first `submit` runs first makes it.
        return self._feeds.setdefault(feed_id, (asyncio.Queue(), set()))

    async def abort(self, request_id: str) -> None:
        self._engine.post(partial(self._engine.abort, request_id))

    async def ping(self) -> tuple[int, str]:
        """Answered on the event loop, never behind an engine step: (base id, incarnation)."""
        return self.base_id, self.incarnation

    async def stats(self) -> BaseStats:
        """As of the latest engine step: a long prefill never delays the answer."""
        return self._engine.stats

    async def set_controller(self, controller: Any) -> None:
        """The controller that hears this base's reports (it calls this when it (re)starts)."""
        self._engine.set_controller(controller)

    async def set_capacity(self, capacity: int) -> None:
        """How many members the cluster can give: a long prompt waits only for a pool that can come."""
        self._engine.post(partial(self.executor.set_capacity, capacity))

    async def set_policy(self, policy: PolicyConfig) -> None:
        await self._engine.ask(partial(self.executor.set_policy, policy))

    async def set_draining(self, member_ids: frozenset[int]) -> dict[int, int]:
        """Stop placing sequences on these members; returns live pooled sequences per member."""
        return await self._engine.ask(partial(self.executor.set_draining, member_ids))

    async def seqs_per_member(self) -> dict[int, int]:
        return await self._engine.ask(self.executor.seqs_per_member)

    async def prepare_epoch(self, spec: EpochSpec) -> tuple[str, int]:
        """Open the rendezvous store of a new group; members join it, then `commit_epoch`."""
        # Loopback when every member shares this node: the group is then unreachable from outside.
        host = LOOPBACK if all(m.node_ip == self.node_ip for m in spec.members) else self.node_ip
        store = DataPlane.host_store(host, self.cfg.data_plane_timeout_s) if spec.members else None
        self._pending_epoch = (spec, store, host)
        return host, (store.port if store is not None else 0)

    async def commit_epoch(self, epoch: int) -> list[str]:
        """Switch the engine to the prepared group between two steps; returns recomputed requests."""
        return await self._engine.ask(partial(self._switch_epoch, epoch))

    async def shutdown(self) -> None:
        self._engine.stop()

    async def step_log(self, clear: bool = False, since_s: float | None = None) -> list[StepRecord]:
        """The latest steps' timings (and phases, with profiling on); those started after
        `since_s` (wall clock) when given: the controller's refit reads only what is new."""
        log_ = list(self._engine.steps)
        if since_s is not None:
            log_ = [r for r in log_ if r.time_s > since_s]
        if clear:
            self._engine.steps.clear()
        return log_

    def _switch_epoch(self, epoch: int) -> list[str]:
        """On the engine thread: adopt the prepared group (joining it waits for every member)."""
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

