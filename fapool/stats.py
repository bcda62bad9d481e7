"""What an engine reports for an operator's metrics (the base actors publish it in `BaseStats`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCounters:
    """KV pages as of now; the rest counts from the engine's start (a restart starts again at 0,
    which Prometheus reads as a counter reset)."""

    kv_used_pages: int = 0
    kv_total_pages: int = 0
    kv_page_size: int = 0  # rows (tokens) per page
    num_preemptions: int = 0
    num_prefill_tokens: int = 0  # prompt rows computed, recomputation after a preemption included
    num_decode_tokens: int = 0  # one-token decode rows computed
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of them, tokens found cached (their prefill skipped)
    prefix_cached_tokens: int = 0  # rows of published pages now (in use or idle)
