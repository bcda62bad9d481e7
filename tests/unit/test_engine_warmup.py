"""Warm-up runs real requests (on CUDA, in the constructor); the counters an operator scrapes
must not include them. Forced here on the CPU: the same code path, no graphs to capture."""
from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.stats import EngineStats

CONFIG = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=2048, max_model_len=256, max_prefill_tokens=64)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_warmup_leaves_counters_at_zero_and_the_cache_empty():
    engine = LLMEngine(CONFIG)
    fresh = engine.stats()  # the CPU skips warm-up unless forced
    steps = []
    real = engine.step
    engine.step = lambda: steps.append(real()) or steps[-1]  # counts, then does the real work
    engine.warmup(force=True)
    assert sum(s.report is not None for s in steps) >= 6  # it ran steps
    assert not engine.has_unfinished()
    after = engine.stats()
    # Every warm-up page returned, no request left, no counter moved.
    assert after == fresh == EngineStats(0, fresh.kv_total_pages, fresh.kv_page_size, 0, 0, 0,
                                         kv_capacity_tokens=fresh.kv_capacity_tokens)


def test_after_warmup_a_request_counts_as_on_a_cold_engine():
    warm, cold = LLMEngine(CONFIG), LLMEngine(CONFIG)
    warm.warmup(force=True)
    prompt = list(range(40, 77))
    [a], [b] = warm.generate([prompt], GREEDY), cold.generate([prompt], GREEDY)
    assert a.token_ids == b.token_ids
    assert warm.stats() == cold.stats()
    assert warm.stats().num_prefill_tokens == len(prompt)
    assert warm.stats().num_decode_tokens == GREEDY.max_tokens - 1  # the first token comes with the prefill
