"""Continuous (iteration-level) batching with chunked prefill: which tokens run in the next step.

Each step has a token budget. Running sequences that decode take one token each; the rest of
the budget goes to prompt chunks, first of sequences whose prefill is under way, then of newly
admitted ones, so a long prompt is prefilled a chunk a step while every stream keeps getting
tokens. Requests join and leave between steps (admission: `fapool/admission.py`).

The scheduler owns the KV pages (`PagedKVCache`, the block manager, as in nano-vllm and vLLM):
pages are taken as sequences grow. When a decode cannot get a page, the youngest running
sequence is preempted: its pages are freed and it queues first, to be prefilled again from its
tokens so far (recompute), which gives the same tokens as an uninterrupted run.

Sequences whose prompt must be prefilled whole (pooled ones, split over the pool's members) run
in prefill steps of their own, and decodes then run in steps of their own.
"""
from __future__ import annotations

from fapool.admission import Admission
from fapool.executor import AttentionExecutor
from fapool.paged_cache import PagedKVCache
from fapool.sequence import Sequence, SeqStatus
from fapool.step_batch import ScheduledStep, SeqSlice, StepBatch


class Scheduler(Admission):
    def __init__(self, cache: PagedKVCache, executor: AttentionExecutor, max_num_seqs: int,
                 max_prefill_tokens: int) -> None:
        super().__init__(cache, executor, max_num_seqs)
        self.token_budget = max_prefill_tokens  # prompt tokens per step, beside the decodes
        self.num_preemptions = 0
        self._decode_turn = False  # alternation when decodes cannot share a step with prefills

    def schedule(self) -> ScheduledStep | None:
        """The next step, or None when nothing can run now."""
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
            return _scheduled("prefill", seqs, slices)
        if separate:
            return self._decode_step()
        if decoding:
            return _scheduled("decode", decoding, [SeqSlice(s.request_id, s.num_cached, 1) for s in decoding])
        return None

    def decode_all(self) -> list[Sequence] | None:
        """The running sequences, if the next step is a local decode of every one of them (nothing
        waits, none is pooled): what a decode launched before the tokens in flight are read runs."""
        if self.waiting or not self.running:
            return None
        ex = self.executor
        if all(s.length - s.num_cached == 1 and not ex.prefill_whole(s.request_id) for s in self.running):
            return self.running
        return None

    def _decode_step(self) -> ScheduledStep | None:
        seqs = self._grown([s for s in self.running if self._decodes(s)])
        if not seqs:
            return None
        return _scheduled("decode", seqs, [SeqSlice(s.request_id, s.num_cached, 1) for s in seqs])

    @staticmethod
    def _decodes(seq: Sequence) -> bool:
        """Its next step is one token, and it may still need one: a sequence whose tokens in flight
        already reach max_tokens ends when they are read."""
        return seq.length - seq.num_cached == 1 and len(seq.output_ids) + seq.pending < seq.params.max_tokens

    def _grown(self, seqs: list[Sequence]) -> list[Sequence]:
        """Give each decoding sequence room for its next token, preempting the youngest running
        sequences while pages are short. Returns those still running."""
        cache = self.cache
        for seq in sorted(seqs, key=lambda s: s.arrival_s):
            rid = seq.request_id
            while seq.status == SeqStatus.RUNNING and not cache.grow(rid, cache.get(rid).length + 1):
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
        if budget <= 0:
            return chunks
        for seq in self.admit():
            left = seq.length - seq.num_cached
            if ex.prefill_whole(seq.request_id) and left > budget and chunks:
                break  # a pooled prompt runs whole: next step
            take = left if ex.prefill_whole(seq.request_id) else min(left, budget)
            chunks.append((seq, take))
            budget -= take
            if budget <= 0:
                break
        return chunks


def _scheduled(kind: str, seqs: list[Sequence], slices: list[SeqSlice]) -> ScheduledStep:
    # A row decodes when it is the one token after the prompt and output so far (a one-token
    # prompt's first step is a prompt row).
    decodes = sum(1 for q, s in zip(seqs, slices) if s.num_tokens == 1 and s.start >= len(q.prompt_ids))
    rows = len(slices) if kind == "decode" else sum(s.num_tokens for s in slices)
    return ScheduledStep(StepBatch(kind, tuple(slices)), tuple(seqs), rows - decodes, decodes)
