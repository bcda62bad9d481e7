"""Warm-up runs real requests (on CUDA, in the constructor); the counters an operator scrapes
must not include them. Forced here on the CPU: the same code path, no graphs to capture."""
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.stats import EngineCounters

CONFIG = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=2048, max_model_len=256, max_prefill_tokens=64)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_warmup_leaves_counters_at_zero_and_the_cache_empty():
    engine = LLMEngine(CONFIG)
    fresh = engine.counters()
    assert engine.last_batch is None  # the CPU skips warm-up unless forced
    engine.warmup(force=True)
    assert engine.last_batch is not None  # it ran steps
    assert not engine.has_unfinished()
    after = engine.counters()
    assert after == fresh == EngineCounters(0, fresh.kv_total_pages, fresh.kv_page_size, 0, 0, 0)
    assert engine.cache.free_pages == engine.cache.num_pages - 1  # every warm-up page returned


def test_after_warmup_a_request_counts_as_on_a_cold_engine():
    warm, cold = LLMEngine(CONFIG), LLMEngine(CONFIG)
    warm.warmup(force=True)
    prompt = list(range(40, 77))
    [a], [b] = warm.generate([prompt], GREEDY), cold.generate([prompt], GREEDY)
    assert a.token_ids == b.token_ids
    assert warm.counters() == cold.counters()
    assert warm.counters().num_prefill_tokens == len(prompt)
    assert warm.counters().num_decode_tokens == GREEDY.max_tokens - 1  # the first token comes with the prefill
