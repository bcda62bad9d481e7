"""Continuous (iteration-level) batching with chunked prefill: which tokens run in the next step.

Each step has a token budget. Running sequences that decode take one token each; the rest of
the budget goes to prompt chunks, first of sequences whose prefill is under way, then of newly
admitted ones, so a long prompt is prefilled a chunk a step while every stream keeps getting
tokens. Requests join and leave between steps; a waiting request is admitted in order when the
cache has room for its prompt.

KV pages are taken as sequences grow. When a decode cannot get a page, the youngest running
sequence is preempted: its pages are freed and it queues first, to be prefilled again from its
tokens so far (recompute), which gives the same tokens as an uninterrupted run.

Prefix caching: at admission a sequence starts after its cached prefix (`PagedKVCache.allocate`
with its tokens); its full pages are published after the steps that write them (`commit`) and
before it frees them, so a finished or preempted sequence leaves its prefix cached.

Sequences whose prompt must be prefilled whole (pooled ones, split over the pool's members) run
in prefill steps of their own, and decodes then run in steps of their own.
"""
from __future__ import annotations

import time
from collections import deque

from fapool.step_batch import SeqSlice, StepBatch
from fapool.executor import AttentionExecutor
from fapool.sequence import Sequence, SeqStatus


def prefix_tokens(seq: Sequence) -> list[int] | None:
    """The tokens to look its prefix up by: those the host knows. None (no lookup) where every
    prompt row must be computed: prompt logprobs score each row."""
    if seq.params.prompt_logprobs is not None:
        return None
    return seq.prompt_ids if not seq.output_ids else seq.token_slice(0, seq.num_known)


class Scheduler:
    def __init__(self, executor: AttentionExecutor, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.executor = executor
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_prefill_tokens  # prompt tokens per step, beside the decodes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._decode_turn = False  # alternation when decodes cannot share a step with prefills

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[StepBatch, list[Sequence]] | None:
        """The next step's batch, or None when nothing can run now."""
        ex = self.executor
        decoding = [s for s in self.running if self._decodes(s)]
        # Pooled sequences exchange per-step messages whose kind is the step's kind: keep their
        # decodes out of prefill steps.
        separate = any(ex.prefill_whole(s.request_id) for s in decoding)
        if separate and decoding and self._decode_turn:
            self._decode_turn = False
            return self._decode_step()
        decoding = [] if separate else self._grown(decoding)
        chunks = self._chunks(self.token_budget)
        if chunks:
            self._decode_turn = True
            seqs = decoding + [s for s, _ in chunks]
            slices = [SeqSlice(s.request_id, s.num_cached, 1) for s in decoding]
            slices += [SeqSlice(s.request_id, s.num_cached, n) for s, n in chunks]
            return StepBatch("prefill", tuple(slices)), seqs
        if separate:
            return self._decode_step()
        if decoding:
            return StepBatch("decode", tuple(SeqSlice(s.request_id, s.num_cached, 1) for s in decoding)), decoding
        return None

    def _decode_step(self) -> tuple[StepBatch, list[Sequence]] | None:
        seqs = self._grown([s for s in self.running if self._decodes(s)])
        if not seqs:
            return None
        return StepBatch("decode", tuple(SeqSlice(s.request_id, s.num_cached, 1) for s in seqs)), seqs

    @staticmethod
    def _decodes(seq: Sequence) -> bool:
        """Its next step is one token, and it may still need one: a sequence whose tokens in flight
        already reach max_tokens ends when they are read."""
        return seq.length - seq.num_cached == 1 and len(seq.output_ids) + seq.pending < seq.params.max_tokens

    def _grown(self, seqs: list[Sequence]) -> list[Sequence]:
        """Give each decoding sequence room for its next token, preempting the youngest running
        sequences while pages are short. Returns those still running."""
        for seq in sorted(seqs, key=lambda s: s.arrival_s):
            while seq.status == SeqStatus.RUNNING and not self.executor.grow(seq.request_id, 1):
                self.preempt(max(self.running, key=lambda s: s.arrival_s))
                self.num_preemptions += 1
        return [s for s in seqs if s.status == SeqStatus.RUNNING]

    def _chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """Prompt chunks for this step: sequences already prefilling first, then admissions."""
        ex = self.executor
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            left = seq.length - seq.num_cached
            if left > 1 and budget > 0:
                if ex.prefill_whole(seq.request_id) and left > budget and chunks:
                    continue
                n = left if ex.prefill_whole(seq.request_id) else min(left, budget)
                chunks.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.length  # the prompt, plus earlier output for a preempted sequence
            tokens = prefix_tokens(seq)
            if not ex.can_allocate(seq.request_id, n, seq.max_length, tokens):
                break  # in order: later requests do not overtake one waiting for room
            self.waiting.popleft()
            seq.num_cached = ex.allocate(seq.request_id, n, seq.max_length, tokens)
            if seq.scheduled_s is None:  # its queue time ends at its first admission
                seq.scheduled_s = time.monotonic()
                seq.cached_tokens = seq.num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n -= seq.num_cached
            if ex.prefill_whole(seq.request_id) and n > budget and chunks:
                break  # a pooled prompt runs whole: next step
            take = n if ex.prefill_whole(seq.request_id) else min(n, budget)
            chunks.append((seq, take))
            budget -= take
        return chunks

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

    def _release(self, seq: Sequence) -> None:
        """Free its pages, publishing first what it wrote (its prefix stays cached)."""
        self.executor.commit(seq.request_id, seq.token_slice, seq.num_known)
        self.executor.free(seq.request_id)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def contexts_in_flight(self) -> list[int]:
        """Context length of every admitted or waiting request (what the pool policy reads)."""
        return [s.length for s in (*self.running, *self.waiting)]
