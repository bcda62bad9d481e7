"""The scheduler's queues and pages: which waiting requests join the running batch, and the KV
they hold while they run.

A waiting request is admitted in order when the pages its prompt needs are free: one waiting for
room holds back those behind it, so none starves. A request its executor holds back (a pool
growing for its long prompt: `PooledAttention.plan`) waits aside instead, because a pool takes
seconds to come: later requests are admitted past it and run on the base meanwhile, and it keeps
its place in the queue, admitted before them once it may start (the pool has come, or
`pool_wait_s` has passed and it starts on the base alone). Waiting aside rather than starting on
the base and moving its KV to members as they join: nothing of the pool's protocol changes, and
the prompt is prefilled once, split as it will decode.

Prefix caching: a sequence placed on the base starts after its longest cached prefix
(`PagedKVCache.allocate` with its tokens); a pooled one is prefilled whole and leaves a full
copy of its prompt's pages on the base (`PagedKVCache.shadow`). Pages are published after the
steps that write them (`publish`) and before a sequence frees them, so a finished or preempted
sequence leaves its prefix cached.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterator

from fapool.executor import AttentionExecutor, Placement
from fapool.paged_cache import PagedKVCache
from fapool.sequence import Sequence, SeqStatus


def prefix_tokens(seq: Sequence) -> list[int] | None:
    """The tokens to look its prefix up by: those the host knows. None (no lookup) where every
    prompt row must be computed: prompt logprobs score each row."""
    if seq.params.prompt_logprobs is not None:
        return None
    return seq.prompt_ids if not seq.output_ids else seq.token_slice(0, seq.num_known)


class Admission:
    def __init__(self, cache: PagedKVCache, executor: AttentionExecutor, max_num_seqs: int) -> None:
        self.cache = cache  # the block manager
        self.executor = executor
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> Iterator[Sequence]:
        """Admit waiting sequences one at a time, as the caller takes them (it stops when its
        step's budget is spent): each gets its pages and its executor's placement."""
        now = time.monotonic()
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            rid = seq.request_id
            waited = now - seq.aside_since_s if seq.aside_since_s is not None else 0.0
            tokens = prefix_tokens(seq)
            cached = self.cache.cached_rows(rid, tokens) if tokens is not None else 0
            placement = self.executor.plan(rid, seq.length, waited, cached)
            if placement is None:  # held back: wait aside, the next may start
                if seq.aside_since_s is None:
                    seq.aside_since_s = now
                i += 1
                continue
            lookup = tokens if placement.shards is None else None  # a pooled share is no prefix
            if not self.cache.can_allocate(placement.room_rows, rid, lookup):
                return  # in order: later requests do not overtake one waiting for room
            del self.waiting[i]
            self.cache.allocate(rid, placement.local_rows, lookup)
            if lookup is None and tokens is not None:
                self.cache.shadow(rid, tokens)  # its pooled prefill also writes a full copy here
            self.executor.place(rid, placement)
            seq.aside_since_s = None
            seq.num_cached = self._computed_rows(seq, placement)
            if seq.scheduled_s is None:  # its queue time ends at its first admission
                seq.scheduled_s = now
                seq.cached_tokens = seq.num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            yield seq

    def _computed_rows(self, seq: Sequence, placement: Placement) -> int:
        """Prompt rows whose K, V are already in the sequence's pages when it is admitted: its
        cached prefix (`PagedKVCache.allocate` with its tokens), where the prefill starts."""
        return self.cache.get(seq.request_id).length

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the batch and release its KV."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's KV and queue it first, to be prefilled again (prompt and
        output so far) when it is re-admitted: recompute, as after the loss of a pool member."""
        assert seq.status == SeqStatus.RUNNING
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def publish(self, seqs: tuple[Sequence, ...] | list[Sequence]) -> None:
        """Publish the full pages a step wrote for these sequences to the prefix cache (after the
        step: never a page whose KV is not written yet)."""
        for seq in seqs:
            self.cache.commit(seq.request_id, seq.token_slice, seq.num_known)

    def _release(self, seq: Sequence) -> None:
        self.publish((seq,))  # what it wrote stays cached (a decode's pages are published here)
        self.cache.free(seq.request_id)
        self.executor.release(seq.request_id)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def contexts_in_flight(self) -> list[int]:
        """Context length of every admitted or waiting request (what the pool policy reads)."""
        return [s.length for s in (*self.running, *self.waiting)]
