"""`LLMEngine`: one device's model, scheduler and token loop, with continuous batching.

    engine = LLMEngine(EngineConfig(model="tiny"))
    [c] = engine.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence as Seq

import torch

from fapool.attention import select_kernel
from fapool.step_batch import StepBatch
from fapool.config import EngineConfig
from fapool.executor import AttentionExecutor, LocalAttention
from fapool.graphs import BUCKETS, SegmentGraphs
from fapool.pool.kv_store import capacity_from_memory
from fapool.paged_cache import PagedKVCache
from fapool.loader import LoadedModel, load_model
from fapool.logits import process_logits
from fapool.logprobs import TokenLogprob, record_prompt_logprobs, sampled_logprobs
from fapool.output import OutputProcessor
from fapool.sampling import SamplingParams, make_generator, sample
from fapool.scheduler import Scheduler
from fapool.inflight import AsyncDecode, InFlight
from fapool.sequence import Completion, RequestOutput, Sequence, SeqStatus
from fapool.stats import EngineCounters
from fapool.step_graph import PagedDecodeGraphs

ExecutorFactory = Callable[[LoadedModel, PagedKVCache], AttentionExecutor]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        executor_factory: ExecutorFactory | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self.loaded = loaded or load_model(config.model, config.device, config.dtype, config.seed,
                                            config.torch_compile)
        cfg, dev = self.loaded.config, self.loaded.device
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        # The arena takes its share up front: leave room for a long prefill's activations.
        capacity = config.kv_capacity_tokens or capacity_from_memory(cfg, self.loaded.dtype, dev, 0.75)
        page = config.page_size or (128 if dev.type == "cuda" else 16)
        self.cache = PagedKVCache(cfg, capacity, self.loaded.dtype, dev, page, self.max_model_len,
                                  config.prefix_caching)
        if executor_factory is None:
            kernel = select_kernel(dev, config.attention_kernel, dtype=self.loaded.dtype)
            self.executor: AttentionExecutor = LocalAttention(self.cache, kernel)
        else:
            self.executor = executor_factory(self.loaded, self.cache)
        self.kernel = getattr(self.executor, "kernel", None)
        self.scheduler = Scheduler(self.executor, config.max_num_seqs, config.max_prefill_tokens)
        graphs = config.cuda_graphs and dev.type == "cuda"
        # The whole decode step in one graph where the kernel reads pages itself; otherwise the
        # non-attention work in graphs, attention eager between them.
        self.step_graphs: PagedDecodeGraphs | None = None
        self.async_decode: AsyncDecode | None = None
        if graphs and self.kernel is not None and self.kernel.paged_in_graph:
            self.use_step_graphs(capture=True)
        # Steps the whole-step graph does not take, prompt chunks included: graph segments.
        self.graphs = SegmentGraphs(self.model, dev, self.loaded.dtype,
                                    config.max_prefill_tokens + config.max_num_seqs) if graphs else None
        self._spill: list[RequestOutput] = []  # outputs read outside a step, reported by the next
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.last_batch: StepBatch | None = None  # what the latest step ran (for step logs)
        self.last_launch_s = 0.0  # host seconds the latest step took to enqueue its GPU work
        self.num_prefill_tokens = self.num_decode_tokens = 0  # rows computed, for the metrics
        self.warmup()  # on CUDA, before a base actor reports ready: the first request costs what the tenth does

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams = SamplingParams(),
        *,
        prompt_token_ids: Seq[int] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises `ValueError` for a request that could never run."""
        ids = self.encode_prompt(prompt, prompt_token_ids)
        self.check_fits(len(ids), params.max_tokens)
        vocab = self.loaded.config.vocab_size
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias names token {bad[0]}; token ids must be in [0, {vocab})")
        request_id = request_id or f"req-{next(self._ids)}"
        if self.scheduler.find(request_id) is not None:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        seq = Sequence(request_id, ids, params, make_generator(params.seed), time.monotonic())
        self.scheduler.add(seq)
        return request_id

    def encode_prompt(self, prompt: str | None, prompt_token_ids: Seq[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt (text) or prompt_token_ids")
        ids = self.tokenizer.encode(prompt) if prompt is not None else list(prompt_token_ids)
        vocab = self.loaded.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]!r}; token ids must be integers in [0, {vocab})")
        return ids

    def check_fits(self, num_prompt: int, max_tokens: int) -> None:
        """Refuse at once a request that no amount of waiting would let run."""
        total = num_prompt + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"model's context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens"
            )
        limit = self.executor.max_seq_tokens()
        if total > limit:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds the KV "
                f"cache ({limit} tokens); shorten the prompt or lower max_tokens"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        return self.outputs.abort(seq)

    def recompute(self, request_ids: Seq[str]) -> None:
        """Drop the KV of these running requests and prefill them again from their tokens so far
        (what a base does when a pool member holding their KV is lost)."""
        self._spill += self._read(self.async_decode.take()) if self._inflight() is not None else []
        seqs = [s for s in (self.scheduler.find(r) for r in request_ids) if s is not None]
        for seq in sorted(seqs, key=lambda s: s.arrival_s, reverse=True):
            self.scheduler.preempt(seq)

    def counters(self) -> EngineCounters:
        c = self.cache
        p = c.prefix
        return EngineCounters(c.num_pages - 1 - c.free_pages, c.num_pages - 1, c.page_size,
                              self.scheduler.num_preemptions, self.num_prefill_tokens, self.num_decode_tokens,
                              p.queries if p else 0, p.hits if p else 0, c.cached_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight() is not None or bool(self._spill)

    def use_step_graphs(self, capture: bool = True) -> None:
        """Run local decode steps whole through `PagedDecodeGraphs` (one graph replay each), with
        async scheduling when `config.async_scheduling`. `capture=False` runs the same step
        eagerly, for tests on the CPU."""
        assert self.kernel is not None, "the executor has no local kernel"
        self.step_graphs = PagedDecodeGraphs(self.model, self.cache, self.kernel, self.config.max_num_seqs, capture,
                                             fuse=self.loaded.compiled)
        self.async_decode = AsyncDecode(self.step_graphs) if self.config.async_scheduling else None

    def _inflight(self) -> InFlight | None:
        return self.async_decode.inflight if self.async_decode is not None else None

    # ---- the token loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step (decodes and prompt chunks); report what each request in it gained. With a
        captured step in flight, what is reported is the previous step's tokens (one step late)."""
        if self._spill:
            out, self._spill = self._spill, []
            return out
        if self._inflight() is not None and not self._chainable():
            return self._read(self.async_decode.take())  # settle first: the next step is not blind
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            self.last_batch = None
            return self._read(self.async_decode.take()) if self._inflight() is not None else []
        batch, seqs = scheduled
        self.last_batch = batch
        decodes = sum(1 for q, s in zip(seqs, batch.slices) if s.num_tokens == 1 and s.start >= len(q.prompt_ids))
        self.num_decode_tokens += decodes
        self.num_prefill_tokens += batch.num_tokens - decodes
        n = len(seqs)
        captured = batch.kind == "decode" and self.step_graphs is not None and self.step_graphs.bucket(n) \
            and self.executor.graph_safe(batch)
        if captured and self.async_decode is not None and not any(s.params.needs_logits for s in seqs):
            self.executor.begin_step(batch)
            prev = self.async_decode.launch(batch, seqs)
            self.executor.end_step()
            self.last_launch_s = time.perf_counter() - t0
            return self._read(prev) if prev is not None else []
        if self._inflight() is not None:  # cannot happen after _chainable(); settle, run it next call
            return self._read(self.async_decode.take())
        # A failure inside the step (a lost pool member) propagates before end_step: nothing of
        # the step is committed, and the scheduler can run it again.
        self.executor.begin_step(batch)
        if captured:
            logits = self.step_graphs.run([seq.token_slice(s.start, s.end)[0] for seq, s in zip(seqs, batch.slices)],
                                          batch.slices)
            sampled = list(range(n))
        else:
            logits, sampled = self._forward(batch, seqs)
        self.executor.end_step()
        # Host time to enqueue the step: near the step's wall time means the host, not the GPU,
        # sets the pace (the benchmark reports it).
        self.last_launch_s = time.perf_counter() - t0
        rows = [seqs[i] for i in sampled]
        params = [q.params for q in rows]
        processed = process_logits(logits, params, [(q.prompt_ids, q.output_ids) for q in rows], self.outputs.eos_ids)
        tokens = sample(processed, params, [q.generator for q in rows])
        # Of the raw logits (see fapool/logprobs.py), so after sampling from the processed ones.
        lps = sampled_logprobs(logits, tokens, [p.logprobs for p in params])
        for seq, s in zip(seqs, batch.slices):
            seq.num_cached = s.end
            self.executor.commit(seq.request_id, seq.token_slice, seq.num_known)  # pages it filled
        return self._append(rows, tokens, lps)

    def _chainable(self) -> bool:
        """Whether the next step is a greedy local decode of every running sequence, none of which
        needs its logits on the host, which can be launched before the tokens in flight are read."""
        sch, ex = self.scheduler, self.executor
        if sch.waiting or not sch.running or self.step_graphs.bucket(len(sch.running)) is None:
            return False
        return all(not s.params.needs_logits and s.length - s.num_cached == 1 and not ex.prefill_whole(s.request_id)
                   for s in sch.running)

    def _read(self, flight: InFlight) -> list[RequestOutput]:
        tokens = flight.tokens()
        for seq in flight.seqs:
            seq.pending -= 1
        # A sequence that finished (or was aborted) meanwhile drops the token of its extra step.
        keep = [(seq, t) for seq, t in zip(flight.seqs, tokens) if seq.status != SeqStatus.FINISHED]
        return self._append([seq for seq, _ in keep], [t for _, t in keep])

    def _append(self, seqs: list[Sequence], tokens: list[int],
                logprobs: list[TokenLogprob | None] | None = None) -> list[RequestOutput]:
        now = time.monotonic()
        results = []
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            out = self.outputs.append(seq, tok, now, logprobs[i] if logprobs is not None else None)
            if out.finished:
                self.scheduler.finish(seq)
            results.append(out)
        return results

    def _forward(self, batch: StepBatch, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """The step without the whole-step graph (graph segments around eager attention where a
        bucket holds it): logits of the rows that sample, and which sequences those are (a prompt
        chunk that does not reach the end samples nothing)."""
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
        record_prompt_logprobs(self.model.logits, hidden, batch, seqs)
        ends = batch.offsets()[1:]
        sampled = [i for i, (seq, s) in enumerate(zip(seqs, batch.slices)) if s.end == seq.length]
        return self.model.logits(hidden[[ends[i] - 1 for i in sampled]]), sampled

    @torch.inference_mode()
    def warmup(self, force: bool = False) -> None:
        """Compile kernels and capture graphs before the first request, so it costs what the
        tenth does: every decode bucket's graph, and prefills of a few lengths. Off CUDA only
        with `force` (tests). The counters start again at zero: warm-up is no user's work."""
        if self.loaded.device.type != "cuda" and not force:
            return  # nothing to compile or capture
        if self.step_graphs is not None:
            self.step_graphs.capture_all()
        if self.graphs is not None:
            self.graphs.capture_all(min_tokens=BUCKETS[-1] + 1)  # prompt chunks' (decode's: when first used)
        budget = self.scheduler.token_budget
        # Alone, then together: prompt chunks up to the budget, and chunks beside decodes.
        for group in ((1,), (7,), (100,), (1000,), (budget,), (3, 50, 2 * budget + 300)):
            if max(group) + 1 > self.max_model_len or not self.cache.can_allocate(sum(group) + 3 * len(group)):
                continue
            sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            rids = [self.add_request(None, sp, prompt_token_ids=[0] * n, request_id=f"warmup-{n}") for n in group]
            while any(self.scheduler.find(r) is not None for r in rids) or self.has_unfinished():
                self.step()
        self.scheduler.num_preemptions = self.num_prefill_tokens = self.num_decode_tokens = 0
        self.cache.reset_prefix()  # warm-up's prompts are no user's prefix

    def generate(
        self, prompts: Seq[str] | Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] = SamplingParams()
    ) -> list[Completion]:
        """Run prompts (texts or token-id lists) to completion, in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        seqs = []
        for p, sp in zip(prompts, plist):
            text, ids = (p, None) if isinstance(p, str) else (None, p)
            rid = self.add_request(text, sp, prompt_token_ids=ids)
            seqs.append(self.scheduler.find(rid))
        while self.has_unfinished():
            self.step()
        return [self.outputs.completion(s) for s in seqs]
