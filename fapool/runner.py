"""The model runner: runs the step the scheduler chose, on the device, and samples its tokens.

    sampled = runner.run(scheduled)   # a ScheduledStep -> Sampled (next tokens, by sequence)
    sampled = runner.settle()         # the tokens of a decode still in flight

A step runs in one of three forms:
- a local decode step whole, as one graph replay (`PagedDecodeGraphs`, where the kernel reads
  pages itself), with async scheduling: launched before the previous step's tokens are read
  (`fapool/inflight.py`), so what `run` returns is then the previous step's tokens;
- the non-attention work in graph segments with attention eager between them (`SegmentGraphs`:
  prompt chunks, pooled decodes);
- eager (the CPU, or a step no bucket holds).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fapool.config import EngineConfig
from fapool.executor import AttentionExecutor
from fapool.graphs import SegmentGraphs
from fapool.inflight import AsyncDecode, InFlight
from fapool.loader import LoadedModel
from fapool.logits import process_logits
from fapool.logprobs import TokenLogprob, prompt_logprobs, sampled_logprobs
from fapool.paged_cache import PagedKVCache
from fapool.sampling import sample
from fapool.sequence import Sequence, SeqStatus
from fapool.step_batch import ScheduledStep
from fapool.step_graph import PagedDecodeGraphs


@dataclass(frozen=True)
class Sampled:
    """Tokens a step sampled: `tokens[i]` is `seqs[i]`'s next token, with its logprob where asked."""

    seqs: tuple[Sequence, ...] = ()
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] | None = None


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache: PagedKVCache, executor: AttentionExecutor,
                 config: EngineConfig, eos_ids: frozenset[int]) -> None:
        self.loaded, self.model, self.cache, self.executor = loaded, loaded.model, cache, executor
        self.config, self.eos_ids = config, eos_ids
        self.kernel = getattr(executor, "kernel", None)
        dev = loaded.device
        graphs = config.cuda_graphs and dev.type == "cuda"
        # The whole decode step in one graph where the kernel reads pages itself; otherwise the
        # non-attention work in graphs, attention eager between them.
        self.step_graphs: PagedDecodeGraphs | None = None
        self.async_decode: AsyncDecode | None = None
        if graphs and self.kernel is not None and self.kernel.paged_in_graph:
            self.use_step_graphs(capture=True)
        # Steps the whole-step graph does not take, prompt chunks included: graph segments.
        self.graphs = SegmentGraphs(self.model, dev, loaded.dtype,
                                    config.max_prefill_tokens + config.max_num_seqs) if graphs else None
        self.launched_s = 0.0  # perf_counter when the latest step's device work was all enqueued

    def use_step_graphs(self, capture: bool = True) -> None:
        """Run local decode steps whole through `PagedDecodeGraphs` (one graph replay each), with
        async scheduling when `config.async_scheduling`. `capture=False` runs the same step
        eagerly, for tests on the CPU."""
        assert self.kernel is not None, "the executor has no local kernel"
        self.step_graphs = PagedDecodeGraphs(self.model, self.cache, self.kernel, self.config.max_num_seqs,
                                             capture, fuse=self.loaded.compiled)
        self.async_decode = AsyncDecode(self.step_graphs) if self.config.async_scheduling else None

    @property
    def in_flight(self) -> bool:
        """Whether a decode step's tokens are still on the device, unread."""
        return self.async_decode is not None and self.async_decode.inflight is not None

    def chains(self, seqs: list[Sequence] | None) -> bool:
        """Whether a decode of exactly `seqs` can be launched before the tokens in flight are read:
        a graph holds the batch and none needs its logits on the host."""
        return seqs is not None and self.step_graphs.bucket(len(seqs)) is not None \
            and not any(s.params.needs_logits for s in seqs)

    def settle(self) -> Sampled:
        """The tokens of the decode in flight (none when nothing is)."""
        return _read(self.async_decode.take()) if self.in_flight else Sampled()

    def run(self, step: ScheduledStep) -> Sampled | None:
        """Run one step; None: not run, for a decode is in flight that it cannot follow (rare:
        the engine settles first unless the next step chains). A failure inside the step (a lost
        pool member) propagates before `end_step`: nothing of it is committed, and the scheduler
        can run it again."""
        batch, seqs = step.batch, step.seqs
        captured = batch.kind == "decode" and self.step_graphs is not None \
            and self.step_graphs.bucket(len(seqs)) and self.executor.graph_safe(batch)
        ex = self.executor
        if captured and self.async_decode is not None and not any(s.params.needs_logits for s in seqs):
            ex.begin_step(batch)
            prev = self.async_decode.launch(batch, seqs)
            ex.end_step()
            self.launched_s = time.perf_counter()
            return _read(prev) if prev is not None else Sampled()
        if self.in_flight:  # read those first: the scheduler makes this step again next time
            return None
        ex.begin_step(batch)
        if captured:
            logits = self.step_graphs.run([seq.token_slice(s.start, s.end)[0] for seq, s in zip(seqs, batch.slices)],
                                          batch.slices)
            sampled = list(range(len(seqs)))
        else:
            logits, sampled = self._forward(step)
        ex.end_step()
        self.launched_s = time.perf_counter()
        rows = [seqs[i] for i in sampled]
        params = [q.params for q in rows]
        processed = process_logits(logits, params, [(q.prompt_ids, q.output_ids) for q in rows], self.eos_ids)
        tokens = sample(processed, params, [q.generator for q in rows])
        # Of the raw logits (see fapool/logprobs.py), so after sampling from the processed ones.
        lps = sampled_logprobs(logits, tokens, [p.logprobs for p in params])
        for seq, s in zip(seqs, batch.slices):
            seq.num_cached = s.end
        return Sampled(tuple(rows), tuple(tokens), tuple(lps))

    def _forward(self, step: ScheduledStep) -> tuple[torch.Tensor, list[int]]:
        """The step without the whole-step graph (graph segments around eager attention where a
        bucket holds it): logits of the rows that sample, and which sequences those are (a prompt
        chunk that does not reach the end samples nothing)."""
        batch, seqs = step.batch, step.seqs
        flat: list[int] = []
        positions: list[int] = []
        for seq, s in zip(seqs, batch.slices):
            flat += seq.token_slice(s.start, s.end)
            positions += range(s.start, s.end)
        # One host-to-device copy for both.
        input_ids, pos = torch.tensor([flat, positions], dtype=torch.long).to(self.loaded.device,
                                                                             non_blocking=True).unbind(0)
        if self.graphs is not None and self.graphs.bucket(len(flat)):
            hidden = self.graphs.run(input_ids, pos, self.executor.attend)
        else:
            hidden = self.model(input_ids, pos, self.executor)
        if batch.kind == "decode":  # every row is its sequence's last token: no gather needed
            return self.model.logits(hidden[: len(seqs)]), list(range(len(seqs)))
        _record_prompt_logprobs(self.model.logits, hidden, step)
        ends = batch.offsets()[1:]
        sampled = [i for i, (seq, s) in enumerate(zip(seqs, batch.slices)) if s.end == seq.length]
        return self.model.logits(hidden[[ends[i] - 1 for i in sampled]]), sampled

    def warmup(self, min_chunk_tokens: int) -> None:
        """Capture every graph a step may take: each decode bucket's whole step, and the segment
        graphs of prompt chunks of at least `min_chunk_tokens` (smaller ones: when first used)."""
        if self.step_graphs is not None:
            self.step_graphs.capture_all()
        if self.graphs is not None:
            self.graphs.capture_all(min_tokens=min_chunk_tokens)


def _read(flight: InFlight) -> Sampled:
    tokens = flight.tokens()
    for seq in flight.seqs:
        seq.pending -= 1
    # A sequence that finished (or was aborted) meanwhile drops the token of its extra step.
    keep = [(seq, t) for seq, t in zip(flight.seqs, tokens) if seq.status != SeqStatus.FINISHED]
    return Sampled(tuple(seq for seq, _ in keep), tuple(t for _, t in keep))


def _record_prompt_logprobs(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                            step: ScheduledStep) -> None:
    """Add to each prompt-logprob request's `prompt_lps` what this step's rows of its prompt give.
    A chunk's row at position p scores prompt token p + 1, so chunked prefill needs no extra pass;
    rows already scored before a preemption are not scored again."""
    offsets = step.batch.offsets()
    for i, (seq, s) in enumerate(zip(step.seqs, step.batch.slices)):
        k = seq.params.prompt_logprobs
        if k is None:
            continue
        lo, hi = max(s.start, len(seq.prompt_lps)), min(s.end, len(seq.prompt_ids) - 1)
        if lo < hi:
            rows = hidden[offsets[i] + lo - s.start : offsets[i] + hi - s.start]
            seq.prompt_lps += prompt_logprobs(logits_of, rows, seq.prompt_ids[lo + 1 : hi + 1], k)
