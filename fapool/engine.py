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
from fapool.config import EngineConfig
from fapool.executor import AttentionExecutor, LocalAttention
from fapool.graphs import SEGMENT_BUCKETS
from fapool.loader import LoadedModel, load_model
from fapool.output import OutputProcessor
from fapool.paged_cache import PagedKVCache
from fapool.pool.kv_store import capacity_from_memory
from fapool.runner import ModelRunner, Sampled
from fapool.sampling import SamplingParams, make_generator
from fapool.scheduler import Scheduler
from fapool.sequence import Completion, RequestOutput, Sequence
from fapool.stats import EngineStats, EngineStep, StepReport
from fapool.step_batch import ScheduledStep

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
        self.scheduler = Scheduler(self.cache, self.executor, config.max_num_seqs, config.max_prefill_tokens)
        self.outputs = OutputProcessor(self.tokenizer)
        self.runner = ModelRunner(self.loaded, self.cache, self.executor, config, self.outputs.eos_ids)
        self.kernel = self.runner.kernel
        self._spill: list[RequestOutput] = []  # outputs read outside a step, reported by the next
        self._ids = itertools.count()
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

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request in flight (their outputs, finish_reason "abort")."""
        return [out for s in [*self.scheduler.running, *self.scheduler.waiting]
                if (out := self.abort(s.request_id)) is not None]

    def recompute(self, request_ids: Seq[str]) -> None:
        """Drop the KV of these running requests and prefill them again from their tokens so far
        (what a base does when a pool member holding their KV is lost)."""
        self._spill += self._postprocess(self.runner.settle())
        seqs = [s for s in (self.scheduler.find(r) for r in request_ids) if s is not None]
        for seq in sorted(seqs, key=lambda s: s.arrival_s, reverse=True):
            self.scheduler.preempt(seq)

    def stats(self) -> EngineStats:
        c, sch, p = self.cache, self.scheduler, self.cache.prefix
        seqs = (*sch.running, *sch.waiting)
        return EngineStats(c.num_pages - 1 - c.free_pages, c.num_pages - 1, c.page_size, sch.num_preemptions,
                           self.num_prefill_tokens, self.num_decode_tokens, len(sch.running), len(sch.waiting),
                           c.reserved_tokens, c.capacity_tokens, tuple(s.length for s in seqs),
                           tuple(s.request_id for s in seqs), prefix_queries=p.queries if p else 0,
                           prefix_hits=p.hits if p else 0, prefix_cached_tokens=c.cached_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.runner.in_flight or bool(self._spill)

    def use_step_graphs(self, capture: bool = True) -> None:
        """See `ModelRunner.use_step_graphs` (`capture=False`: the whole-step path eagerly, on the CPU)."""
        self.runner.use_step_graphs(capture)

    def set_token_budget(self, max_prefill_tokens: int) -> None:
        """Prompt tokens a step may carry beside its decodes, from now on."""
        self.scheduler.token_budget = max_prefill_tokens

    # ---- the token loop -------------------------------------------------------------------
    def step(self) -> EngineStep:
        """Schedule one step (decodes and prompt chunks), run it, and report what each request in
        it gained. With a captured step in flight, the tokens reported are the previous step's
        (one step late)."""
        if self._spill:
            out, self._spill = self._spill, []
            return EngineStep(out)
        runner = self.runner
        if runner.in_flight and not runner.chains(self.scheduler.decode_all()):
            return EngineStep(self._postprocess(runner.settle()))  # settle first: the next step is not blind
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return EngineStep(self._postprocess(runner.settle()))
        sampled = runner.run(scheduled)
        if sampled is None:  # it cannot follow the decode in flight: settle, schedule it again next call
            return EngineStep(self._postprocess(runner.settle()))
        report = self._report(scheduled, runner.launched_s - t0)
        if scheduled.batch.kind == "prefill":  # prompt pages it filled, for the prefix cache
            self.scheduler.publish(scheduled.seqs)
        return EngineStep(self._postprocess(sampled), report)

    def _report(self, scheduled: ScheduledStep, launch_s: float) -> StepReport:
        self.num_decode_tokens += scheduled.num_decode_tokens
        self.num_prefill_tokens += scheduled.num_prompt_tokens
        return StepReport(scheduled.batch, scheduled.num_prompt_tokens, scheduled.num_decode_tokens, launch_s,
                          self.executor.phase_times())

    def _postprocess(self, sampled: Sampled) -> list[RequestOutput]:
        """Each sampled token into its request's output; a finished request leaves the batch."""
        now = time.monotonic()
        results = []
        lps = sampled.logprobs
        for i, (seq, tok) in enumerate(zip(sampled.seqs, sampled.tokens)):
            out = self.outputs.append(seq, tok, now, lps[i] if lps is not None else None)
            if out.finished:
                self.scheduler.finish(seq)
            results.append(out)
        return results

    @torch.inference_mode()
    def warmup(self, force: bool = False) -> None:
        """Compile kernels and capture graphs before the first request, so it costs what the
        tenth does: every decode bucket's graph, and prefills of a few lengths. Off CUDA only
        with `force` (tests). The counters start again at zero: warm-up is no user's work."""
        if self.loaded.device.type != "cuda" and not force:
            return  # nothing to compile or capture
        self.runner.warmup(min_chunk_tokens=SEGMENT_BUCKETS[-1] + 1)  # prompt chunks' graphs (decode's: when first used)
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
