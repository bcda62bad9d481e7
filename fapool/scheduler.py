"""Continuous (iteration-level) batching: which sequences run in the next step.

Each step is either a prefill of newly admitted prompts or one decode token for every running
sequence; requests join and leave between steps. A request is admitted only when the executor can
reserve KV for its whole life, so admitted work never runs out of memory; the rest waits in order.
"""
from __future__ import annotations

from collections import deque

from fapool.batch import SeqSlice, StepBatch
from fapool.executor import AttentionExecutor
from fapool.sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, executor: AttentionExecutor, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.executor = executor
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[StepBatch, list[Sequence]] | None:
        """The next step's batch: a prefill when a waiting request can be admitted, else a decode."""
        admitted = self._admit()
        if admitted:
            slices = tuple(SeqSlice(s.request_id, s.num_cached, s.length - s.num_cached) for s in admitted)
            return StepBatch("prefill", slices), admitted
        if self.running:
            slices = tuple(SeqSlice(s.request_id, s.num_cached, 1) for s in self.running)
            return StepBatch("decode", slices), list(self.running)
        return None

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.length  # the prompt, plus earlier output for a preempted sequence
            # A prompt longer than the budget still runs, alone, so it cannot starve.
            if admitted and n > budget:
                break
            if not self.executor.can_allocate(seq.request_id, n, seq.max_length):
                break  # in order: later requests do not overtake one waiting for room
            self.waiting.popleft()
            self.executor.allocate(seq.request_id, n, seq.max_length)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= n
        return admitted

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the batch and release its KV."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self.executor.free(seq.request_id)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's KV and queue it first, to be prefilled again (prompt and
        output so far) when it is re-admitted: recompute, as after the loss of a pool member."""
        assert seq.status == SeqStatus.RUNNING
        self.running.remove(seq)
        self.executor.free(seq.request_id)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def contexts_in_flight(self) -> list[int]:
        """Context length of every admitted or waiting request (what the pool policy reads)."""
        return [s.length for s in (*self.running, *self.waiting)]
