"""Prefix caching: the page bookkeeping (hash chain, references, LRU, publication after the write)
and, on a real Hugging Face checkpoint, greedy tokens with a cache hit equal to those without."""
import numpy as np
import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.config import TINY
from fapool.paged_cache import PagedKVCache
from tests.helpers.checkpoints import make_llama_checkpoint

PS = 16
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def cache(pages: int = 16, **kw) -> PagedKVCache:
    return PagedKVCache(TINY, pages * PS, torch.float32, torch.device("cpu"), PS, **kw)


def toks(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 250, n).tolist()


def run(c: PagedKVCache, sid: str, tokens: list[int]) -> int:
    """Admit `tokens`, 'write' them (a step's end), publish; returns the rows it found cached."""
    hit = c.allocate(sid, len(tokens), tokens).length
    c.get(sid).length = len(tokens)
    c.commit(sid, lambda a, b: tokens[a:b], len(tokens))
    return hit


def test_full_pages_are_shared_and_the_last_token_is_always_computed():
    c = cache()
    doc = toks(3 * PS)
    assert run(c, "a", doc) == 0
    assert c.cached_tokens == 3 * PS
    # The same prompt: its last page holds its last token, whose logits are needed -> 2 pages.
    assert run(c, "b", doc) == 2 * PS
    assert c.get("b").pages[:2] == c.get("a").pages[:2]
    assert c.get("b").pages[2] != c.get("a").pages[2]
    # One token more: all three pages hit; the fourth page is its own.
    assert run(c, "c", doc + [7]) == 3 * PS
    assert c.get("c").pages[:3] == c.get("a").pages[:3]
    shared = c.get("a").pages[0]
    assert c.prefix.refs[shared] == 3
    assert (c.prefix.queries, c.prefix.hits) == (3 * 3 * PS + 1, 5 * PS)


def test_a_prompt_that_diverges_inside_a_page_recomputes_that_page_in_a_new_one():
    c = cache()
    doc = toks(4 * PS)
    run(c, "a", doc)
    other = doc[: 2 * PS + 5] + toks(30, seed=1)  # diverges 5 rows into page 2
    hit = c.allocate("b", len(other), other).length
    assert hit == 2 * PS
    a, b = c.get("a").pages, c.get("b").pages
    assert b[:2] == a[:2]
    # Every row it computes lands outside the shared pages: a hit never writes into one.
    written = set((c.slots("b", hit, len(other)) // PS).tolist())
    assert written.isdisjoint(a)


def test_a_page_is_published_only_once_full_and_written():
    c = cache()
    doc = toks(2 * PS + 3)
    c.allocate("a", len(doc), doc)
    c.commit("a", lambda x, y: doc[x:y], len(doc))  # no step has written it yet
    assert c.cached_tokens == 0
    c.get("a").length = PS + 4  # a chunk wrote 20 rows: one full page
    c.commit("a", lambda x, y: doc[x:y], len(doc))
    assert c.cached_tokens == PS
    c.get("a").length = len(doc)
    c.commit("a", lambda x, y: doc[x:y], 2 * PS - 1)  # the host knows fewer tokens than were written
    assert c.cached_tokens == PS
    c.commit("a", lambda x, y: doc[x:y], len(doc))
    assert c.cached_tokens == 2 * PS


def test_freeing_drops_references_and_idle_pages_are_evicted_lru_only_when_free_pages_run_out():
    c = cache(pages=8)
    a, b = toks(3 * PS + 1, seed=1), toks(3 * PS + 1, seed=2)
    run(c, "a", a)
    run(c, "a2", a)  # shares a's 3 pages
    c.free("a")  # cancel one holder: the shared pages stay with the other
    assert all(c.prefix.refs[p] == 1 for p in c.get("a2").pages[:3])
    c.free("a2")
    run(c, "b", b)
    c.free("b")
    assert c.free_pages == 8 and c.cached_tokens == 6 * PS  # all idle, all still cached
    # 3 pages wanted, 2 never-used pages free: one idle page is evicted, the least recently used
    # (a's tail page: a sequence's last pages go first).
    assert run(c, "x", toks(3 * PS, seed=3)) == 0
    assert c.cached_tokens == 8 * PS  # 6 - 1 evicted + x's 3
    assert c.cached_rows(None, a) == 2 * PS  # a lost its tail page
    assert c.cached_rows(None, b) == 3 * PS  # b, freed later, untouched
    assert not c.can_allocate(6 * PS)  # x's pages are held: only the 5 idle ones can go


def test_can_allocate_counts_the_hit_and_its_idle_pages():
    c = cache(pages=4)
    doc = toks(3 * PS + 1)
    run(c, "a", doc)
    c.free("a")  # 3 idle cached pages + 1 free
    assert c.can_allocate(len(doc), "b", doc)  # 3 hit + 1 new page
    assert not c.can_allocate(5 * PS, "c", toks(5 * PS, seed=9))
    assert run(c, "b", doc) == 3 * PS and c.free_pages == 0


def test_a_pooled_share_leaves_a_full_copy_published_only_after_its_prefill():
    c = cache(pages=12)
    doc = toks(3 * PS + 5)
    c.allocate("p", PS)  # its zigzag share of rows: no prefix, never published
    c.shadow("p", doc)  # pages for a copy of its 3 full pages
    rows, slots = c.shadow_rows("p")
    assert len(rows) == len(slots) == 3 * PS and rows.tolist() == list(range(3 * PS))
    assert c.free_pages == 12 - 1 - 3
    c.commit("p", lambda a, b: doc[a:b], len(doc))
    assert c.cached_tokens == 0  # its prefill has not run
    c.get("p").length = PS  # the prefill step ended
    c.commit("p", lambda a, b: doc[a:b], len(doc))
    assert c.cached_tokens == 3 * PS and c.free_pages == 12 - 1  # the copy is idle at once
    assert c.cached_rows(None, doc) == 3 * PS
    c.allocate("q", PS)
    c.shadow("q", toks(2 * PS, seed=4))
    c.free("q")  # a prefill that never ran gives its copy back
    assert c.free_pages == 12 - 1 and c.cached_tokens == 3 * PS


def test_off_means_no_lookup_and_no_publication():
    c = cache(prefix_caching=False)
    doc = toks(3 * PS)
    assert run(c, "a", doc) == 0 and run(c, "b", doc) == 0
    assert c.cached_tokens == 0 and c.prefix is None


# ---- exactness on a real checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("llama-prefix"), gqa=True)


def engine(checkpoint, prefix: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", page_size=PS, prefix_caching=prefix,
                                  **{"kv_capacity_tokens": 4096, **kw}))


def test_greedy_tokens_with_a_hit_equal_those_without(checkpoint):
    doc = toks(100, seed=5)
    prompts = [doc + toks(6, seed=6),  # a question over the document
               doc + toks(9, seed=7),  # another: hit on doc's 6 full pages
               doc[:41] + toks(20, seed=8),  # diverges inside page 2: hit ends there, page 2 recomputed
               doc,  # the document itself: the last token's page is computed
               doc + toks(6, seed=6)]  # the first prompt again, generated pages and all
    cold, warm = engine(checkpoint, False), engine(checkpoint, True)
    want = [cold.generate([p], GREEDY)[0].token_ids for p in prompts]
    runs = [warm.generate([p], GREEDY)[0] for p in prompts]
    assert [r.token_ids for r in runs] == want
    assert [r.cached_tokens for r in runs] == [0, 96, 32, 96, 96]
    # Side by side in one batch, sharing pages while they run.
    batch = warm.generate([doc + toks(6, seed=s) for s in (11, 12, 13)], GREEDY)
    assert [c.token_ids for c in batch] == [c.token_ids for c in cold.generate(
        [doc + toks(6, seed=s) for s in (11, 12, 13)], GREEDY)]
    assert all(c.cached_tokens == 96 for c in batch)
    assert warm.stats().prefix_hits == 96 * 6 + 32


def test_preemption_and_cancellation_never_free_a_page_still_shared(checkpoint):
    # 12 pages: four sequences sharing a 3-page prefix outgrow them while decoding, so the
    # youngest are preempted (and re-admitted on their cached prefix); one is cancelled mid-run.
    doc = toks(3 * PS, seed=21)
    prompts = [doc + toks(5, seed=s) for s in range(4)]
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    cold = engine(checkpoint, False)
    want = [c.token_ids for c in cold.generate(prompts, long)]
    warm = engine(checkpoint, True, kv_capacity_tokens=12 * PS)
    warm.generate([doc + [1]], GREEDY)  # the prefix cached
    rids = [warm.add_request(None, long, prompt_token_ids=p) for p in prompts]
    seqs = {r: warm.scheduler.find(r) for r in rids}
    done: dict[str, list[int]] = {r: [] for r in rids}
    steps = 0
    while warm.has_unfinished():
        for out in warm.step().outputs:
            done[out.request_id] += out.new_token_ids
        steps += 1
        if steps == 6:
            warm.abort(rids[1])
        c = warm.cache
        held = [p for s in c.seq_ids() for p in c.get(s).pages]
        assert all(c.prefix.refs[p] == held.count(p) for p in set(held))  # a reference per holder
    assert warm.scheduler.num_preemptions > 0
    for i in (0, 2, 3):
        assert tuple(done[rids[i]]) == want[i]
        assert seqs[rids[i]].cached_tokens == 3 * PS
    assert warm.cache.free_pages == 12  # everything released, whatever stays cached


def test_a_prompt_a_pool_served_is_found_on_its_base_and_skips_that_prefill():
    from tests.unit.test_pool_gloo import ENGINE, GlooPool  # prompts of 16+ tokens use the pool

    doc = toks(70, seed=31)
    question = doc + toks(9, seed=32)
    alone = LLMEngine(ENGINE)  # no pool, no prefix caching
    want = [alone.generate([p], GREEDY)[0].token_ids for p in (doc, question)]
    pool = GlooPool(config=ENGINE.replace(prefix_caching=True))
    try:
        first = pool.engine.generate([doc], GREEDY)[0]
        assert pool.executor.stats().pooled_total == 1 and first.cached_tokens == 0
        # Its base kept a full copy of its 4 full pages; the question's uncached rest (15 tokens)
        # is below the pool's threshold, so it runs on the base from its cached prefix.
        before = pool.engine.num_prefill_tokens
        second = pool.engine.generate([question], GREEDY)[0]
        assert second.cached_tokens == 4 * PS
        assert pool.engine.num_prefill_tokens - before == len(question) - 4 * PS
        assert pool.executor.stats().pooled_total == 1
        assert [first.token_ids, second.token_ids] == want
    finally:
        pool.close()
    assert all(s.cache.seq_ids() == [] for s in pool.servers)  # the members' shards are freed
