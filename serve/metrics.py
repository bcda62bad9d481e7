"""Prometheus metrics (the contract's `fapool_*` names, and what an operator needs besides, after
vLLM's) and the latency window behind `/pool`.

Per-request histograms and counters are recorded where the tokens stream through the ingress;
pool, queue, KV-cache and engine gauges and counters are read from the controller's and bases'
latest snapshot at scrape time, so `/metrics` covers every base actor and the controller.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from actors.messages import BaseStats, PoolStatus

METRIC_NAMES = (
    "fapool_pool_size",
    "fapool_pool_target",
    "fapool_pool_scale_events_total",
    "fapool_requests_running",
    "fapool_requests_waiting",
    "fapool_prompt_tokens_total",
    "fapool_generation_tokens_total",
    "fapool_time_to_first_token_seconds",
    "fapool_time_per_output_token_seconds",
    "fapool_e2e_request_latency_seconds",
    "fapool_request_context_tokens",
)
# Beside the contract, as vLLM exports them (vllm:kv_cache_usage_perc, vllm:num_preemptions,
# vllm:request_success{finished_reason}, vllm:request_queue_time_seconds, ...); name -> type.
OPERATOR_METRICS = {
    "fapool_kv_cache_used_pages": "gauge",  # {base}
    "fapool_kv_cache_total_pages": "gauge",  # {base}
    "fapool_kv_cache_usage_ratio": "gauge",  # {base}: used / total pages, 0..1
    "fapool_pool_member_kv_used_tokens": "gauge",  # {member}: rows the bases hold on each pool member
    "fapool_pool_member_kv_total_tokens": "gauge",  # {member}: the bases' shares of its arena
    "fapool_preemptions_total": "counter",  # {base}
    "fapool_prefill_tokens_total": "counter",  # {base}: prompt rows computed (recompute included)
    "fapool_decode_tokens_total": "counter",  # {base}
    # As vllm:prefix_cache_queries / vllm:prefix_cache_hits, in tokens: hits / queries is the hit rate.
    "fapool_prefix_cache_queries_total": "counter",  # {base}: prompt tokens looked up
    "fapool_prefix_cache_hits_total": "counter",  # {base}: of them, found cached (prefill skipped)
    "fapool_prefix_cache_tokens": "gauge",  # {base}: rows of cached (published) pages, in use or idle
    "fapool_requests_finished_total": "counter",  # {reason}: stop, length, abort, error
    "fapool_request_queue_time_seconds": "histogram",
    "fapool_request_prompt_tokens": "histogram",
    "fapool_request_generation_tokens": "histogram",
    "fapool_pool_pending": "gauge",  # members the policy wants that the cluster cannot place yet
    "fapool_cost_fit_error": "gauge",  # {kind}: the SLO policy's cost fit, median |predicted/measured - 1|
}
FINISH_REASONS = ("stop", "length", "abort", "error")
disable_created_metrics()  # the *_created series only clutter the exposition
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = tuple(2**k for k in range(4, 19))  # 16 .. 262144 tokens


class Snapshot:
    """The latest pool status and queue counts, as the collector and `/pool` see them."""

    def __init__(self) -> None:
        self.status: PoolStatus | None = None
        self.running = 0
        self.waiting = 0
        self.scale_counts: dict[str, int] = {"up": 0, "down": 0}
        self.bases: list[BaseStats] = []  # the healthy bases' latest stats
        self.time_s = 0.0


class _PoolCollector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        st = snap.status
        yield GaugeMetricFamily("fapool_pool_size", "Pool actors alive", value=st.size if st else 0)
        yield GaugeMetricFamily("fapool_pool_target", "Pool size the policy wants", value=st.target if st else 0)
        events = CounterMetricFamily("fapool_pool_scale_events", "Pool scale events", labels=["direction"])
        for direction in ("up", "down"):
            events.add_metric([direction], snap.scale_counts.get(direction, 0))
        yield events
        yield GaugeMetricFamily("fapool_pool_pending", "Pool members wanted but not placed yet",
                                value=st.pending if st else 0)
        fit_error = GaugeMetricFamily("fapool_cost_fit_error", "Median relative error of the step-time fit "
                                      "over the steps it was fitted on", labels=["kind"])
        for kind in ("decode", "prefill"):  # NaN until the fit has steps of the kind
            err = getattr(st.fit, f"{kind}_error") if st and st.fit else None
            fit_error.add_metric([kind], float("nan") if err is None else err)
        yield fit_error
        yield GaugeMetricFamily("fapool_requests_running", "Requests in running batches", value=snap.running)
        yield GaugeMetricFamily("fapool_requests_waiting", "Requests waiting for admission", value=snap.waiting)
        # A base keeps its share of a member until it hears the member left: only members in the
        # pool now have series, so a drained member's go away at the next scrape.
        yield from _engine_metrics(snap.bases, set(snap.status.members) if snap.status else None)


PREFIX_CACHE_HOLDS = ("full KV pages of earlier prompts and outputs on each base, keyed by their tokens; "
                      "idle pages are evicted least recently used first when pages run out; a pooled "
                      "prompt leaves a full copy on its base, its shards on the members are freed")


def prefix_cache_summary(enabled: bool, bases: list[BaseStats]) -> dict:
    """What `/pool` says of the prefix cache: what it holds, and its totals over the bases."""
    queries = sum(b.engine.prefix_queries for b in bases)
    hits = sum(b.engine.prefix_hits for b in bases)
    return {"enabled": enabled, "holds": PREFIX_CACHE_HOLDS if enabled else "nothing (--no-prefix-caching)",
            "cached_tokens": sum(b.engine.prefix_cached_tokens for b in bases),
            "queries_tokens": queries, "hits_tokens": hits, "hit_rate": hits / queries if queries else 0.0}


def _engine_metrics(bases: list[BaseStats], members: set[int] | None) -> Iterable[Metric]:
    def family(kind: type, name: str, doc: str, label: str = "base") -> Metric:
        return kind(name, doc, labels=[label])

    used = family(GaugeMetricFamily, "fapool_kv_cache_used_pages", "KV-cache pages held by sequences")
    total = family(GaugeMetricFamily, "fapool_kv_cache_total_pages", "KV-cache pages in all")
    ratio = family(GaugeMetricFamily, "fapool_kv_cache_usage_ratio", "KV-cache pages used / total (0..1)")
    preempt = family(CounterMetricFamily, "fapool_preemptions", "Sequences preempted (recomputed) for want of pages")
    prefill = family(CounterMetricFamily, "fapool_prefill_tokens", "Prompt rows computed (recomputation included)")
    decode = family(CounterMetricFamily, "fapool_decode_tokens", "Decode rows computed")
    queries = family(CounterMetricFamily, "fapool_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
    hits = family(CounterMetricFamily, "fapool_prefix_cache_hits", "Prompt tokens found in the prefix cache")
    cached = family(GaugeMetricFamily, "fapool_prefix_cache_tokens", "KV rows the prefix cache holds (in use or idle)")
    member_used: dict[int, int] = {}
    member_total: dict[int, int] = {}
    for b in bases:
        e, label = b.engine, [str(b.base_id)]
        used.add_metric(label, e.kv_used_pages)
        total.add_metric(label, e.kv_total_pages)
        ratio.add_metric(label, e.kv_used_pages / e.kv_total_pages if e.kv_total_pages else 0.0)
        preempt.add_metric(label, e.num_preemptions)
        prefill.add_metric(label, e.num_prefill_tokens)
        decode.add_metric(label, e.num_decode_tokens)
        queries.add_metric(label, e.prefix_queries)
        hits.add_metric(label, e.prefix_hits)
        cached.add_metric(label, e.prefix_cached_tokens)
        # A share of each member's arena; with no pool status yet (None) every member a base names.
        for mid, rows, share in (m for m in b.members_kv if members is None or m[0] in members):
            member_used[mid] = member_used.get(mid, 0) + rows
            member_total[mid] = member_total.get(mid, 0) + share
    m_used = family(GaugeMetricFamily, "fapool_pool_member_kv_used_tokens", "KV rows held on a pool member", "member")
    m_total = family(GaugeMetricFamily, "fapool_pool_member_kv_total_tokens", "KV rows of a pool member", "member")
    for mid in sorted(member_used):
        m_used.add_metric([str(mid)], member_used[mid])
        m_total.add_metric([str(mid)], member_total[mid])
    yield from (used, total, ratio, preempt, prefill, decode, queries, hits, cached, m_used, m_total)


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("fapool_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("fapool_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("fapool_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fapool_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fapool_e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.context = Histogram("fapool_request_context_tokens", "Prompt + generated tokens per request",
                                 buckets=TOKEN_BUCKETS, registry=r)
        self.finished = Counter("fapool_requests_finished", "Requests finished, by reason", ["reason"], registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # every reason present from the start, at 0
        self.queue = Histogram("fapool_request_queue_time_seconds", "Time from arrival at a base to admission",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("fapool_request_prompt_tokens", "Prompt tokens per request",
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.generation_len = Histogram("fapool_request_generation_tokens", "Generated tokens per request",
                                        buckets=(1, 2, 4, 8) + TOKEN_BUCKETS, registry=r)
        r.register(_PoolCollector(snapshot))
        self.window = LatencyWindow()

    def observe_finish(self, reason: str) -> None:
        self.finished.labels(reason if reason in FINISH_REASONS else "error").inc()

    def observe_request(self, ttft_s: float | None, tpot_s: float | None, e2e_s: float,
                        prompt_tokens: int, completion_tokens: int, queue_s: float | None = None) -> None:
        if queue_s is not None:
            self.queue.observe(queue_s)
        self.prompt_len.observe(prompt_tokens)
        self.generation_len.observe(completion_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        self.context.observe(prompt_tokens + completion_tokens)
        self.window.add(ttft_s, tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyWindow:
    """TTFT/TPOT of the requests that ended in the last `window_s` seconds, for the dashboard."""

    def __init__(self, window_s: float = 60.0, max_items: int = 10000) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float | None, float | None]] = deque(maxlen=max_items)

    def add(self, ttft_s: float | None, tpot_s: float | None) -> None:
        self._items.append((time.time(), ttft_s, tpot_s))

    def summary(self) -> dict:
        cutoff = time.time() - self.window_s
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()
        ttft = sorted(x for _, x, _ in self._items if x is not None)
        tpot = sorted(x for _, _, x in self._items if x is not None)
        return {"window_s": self.window_s, "count": len(self._items),
                "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot)}


def _percentiles(xs: list[float]) -> dict[str, float | None]:
    def pick(q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}
