"""What an engine reports: each step's `EngineStep` (its outputs and what ran), and `EngineStats`,
its state for an operator's metrics (the base actors publish it in `BaseStats`)."""
from __future__ import annotations

from dataclasses import dataclass

from fapool.sequence import RequestOutput
from fapool.step_batch import StepBatch


@dataclass(frozen=True)
class EngineStats:
    """Requests and KV pages as of now; the counters count from the engine's start (a restart
    starts again at 0, which Prometheus reads as a counter reset)."""

    kv_used_pages: int = 0
    kv_total_pages: int = 0
    kv_page_size: int = 0  # rows (tokens) per page
    num_preemptions: int = 0
    num_prefill_tokens: int = 0  # prompt rows computed, recomputation after a preemption included
    num_decode_tokens: int = 0  # one-token decode rows computed
    running: int = 0
    waiting: int = 0  # queued requests, those waiting for the pool among them
    kv_used_tokens: int = 0  # rows held by live sequences (whole pages)
    kv_capacity_tokens: int = 0
    contexts: tuple[int, ...] = ()  # tokens of each request in flight, running then waiting
    request_ids: tuple[str, ...] = ()  # the same requests' ids
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of them, tokens found cached (their prefill skipped)
    prefix_cached_tokens: int = 0  # rows of published pages now (in use or idle)


@dataclass(frozen=True)
class StepReport:
    """What one step ran: the batch it launched (a decode launched ahead of its tokens included),
    the rows it computed, and the host seconds it took to enqueue its device work (near the step's
    wall time: the host, not the device, sets the pace)."""

    batch: StepBatch
    num_prompt_tokens: int
    num_decode_tokens: int
    launch_s: float
    phases: tuple[tuple[str, float], ...] = ()  # seconds per phase, with profiling on

    @property
    def kind(self) -> str:
        return self.batch.kind

    @property
    def num_seqs(self) -> int:
        return len(self.batch.slices)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_decode_tokens


@dataclass(frozen=True)
class EngineStep:
    """One `LLMEngine.step`: what each request gained, and what ran (None: nothing new was launched,
    the step only reported tokens already computed, or nothing could run)."""

    outputs: list[RequestOutput]
    report: StepReport | None = None
