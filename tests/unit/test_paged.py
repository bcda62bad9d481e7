"""The paged KV cache and attention over it: pages as sequences grow, kernels against float64
attention over scattered pages, and KV splits merged by LSE."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fapool.attention import select_kernel
from fapool.attention.paged import PagedPlan, merge_splits, split_table
from fapool.config import TINY
from fapool.paged_cache import PagedKVCache

CPU = torch.device("cpu")


def attention64(q, k, v, causal):
    """float64 attention with GQA, bottom-right causal; returns out and lse (Hq, Tq)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    k = k.double().repeat_interleave(hq // hkv, dim=1)
    v = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(d)
    if causal:
        mask = torch.arange(tk)[None, :] > (tk - tq + torch.arange(tq))[:, None]
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v), lse


def filled_cache(lengths, page=8, seed=0):
    """A cache whose sequences got their pages interleaved (scattered), filled with random rows."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(TINY, 4096, torch.float32, CPU, page_size=page)
    ids = [f"s{i}" for i in range(len(lengths))]
    for sid in ids:
        cache.allocate(sid, 1)
    for rows in range(1, max(lengths) + 1):  # grow in turns so pages interleave
        for sid, n in zip(ids, lengths):
            if rows <= n:
                assert cache.grow(sid, rows)
    dense = {}
    for sid, n in zip(ids, lengths):
        k = torch.randn(n, TINY.num_key_value_heads, TINY.head_dim, generator=g)
        v = torch.randn(n, TINY.num_key_value_heads, TINY.head_dim, generator=g)
        cache.write(0, torch.from_numpy(cache.slots(sid, 0, n)), k, v)
        cache.get(sid).length = n
        dense[sid] = (k, v)
    return cache, ids, dense


def test_pages_come_and_go_with_the_sequence():
    cache = PagedKVCache(TINY, 64, torch.float32, CPU, page_size=16)
    assert cache.capacity_tokens == 64 and cache.free_pages == 4
    cache.allocate("a", 20)  # two pages
    assert cache.reserved_tokens == 32 and cache.grow("a", 32) and cache.reserved_tokens == 32
    assert cache.grow("a", 33) and cache.reserved_tokens == 48
    cache.allocate("b", 16)
    assert not cache.grow("a", 64) and cache.reserved_tokens == 64  # nothing taken on failure
    cache.free("b")
    with pytest.raises(MemoryError):
        cache.allocate("b", 17)
    assert "b" not in cache
    with pytest.raises(ValueError, match="fit one sequence"):
        cache.grow("a", 65)
    cache.free("a")
    assert cache.reserved_tokens == 0 and cache.free_pages == 4
    assert 0 not in cache.allocate("c", 64).pages  # page 0 is the scratch page


def test_slots_follow_the_page_list():
    cache, ids, _ = filled_cache([5, 19, 11], page=4)
    pages = cache.get("s1").pages
    want = [pages[r // 4] * 4 + r % 4 for r in range(19)]
    assert cache.slots("s1", 0, 19).tolist() == want
    assert len(set(pages)) == len(pages) == 5


@pytest.mark.parametrize("name", ["reference"])
def test_paged_decode_and_prefill_equal_attention(name):
    kernel = select_kernel(CPU, name)
    lengths = [1, 7, 33, 64, 100]
    cache, ids, dense = filled_cache(lengths, page=8, seed=1)
    g = torch.Generator().manual_seed(2)
    hq, d = TINY.num_attention_heads, TINY.head_dim
    kp, vp = cache.pages_view(0)
    # Decode: one query per sequence over all its rows.
    q = torch.randn(len(ids), hq, d, generator=g)
    plan = PagedPlan.build(cache.page_table(ids), lengths, [1] * len(ids), cache.page_size, CPU)
    out, lse = kernel.decode_paged(q, kp, vp, plan)
    for i, sid in enumerate(ids):
        o64, l64 = attention64(q[i : i + 1], *dense[sid], causal=False)
        torch.testing.assert_close(out[i : i + 1].double(), o64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse[:, i].double(), l64[:, 0], rtol=1e-4, atol=1e-5)
    # Prefill chunks: the last q_lens[i] rows of each sequence, causal.
    q_lens = [1, 3, 33, 10, 17]
    qf = torch.randn(sum(q_lens), hq, d, generator=g)
    plan = PagedPlan.build(cache.page_table(ids), lengths, q_lens, cache.page_size, CPU)
    out = kernel.prefill_paged(qf, kp, vp, plan)
    lo = 0
    for sid, n in zip(ids, q_lens):
        o64, _ = attention64(qf[lo : lo + n], *dense[sid], causal=True)
        torch.testing.assert_close(out[lo : lo + n].double(), o64, rtol=1e-4, atol=1e-5)
        lo += n


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_kv_splits_merge_to_the_unsplit_result(splits):
    kernel = select_kernel(CPU, "reference")
    lengths = [1, 9, 40, 130]
    cache, ids, dense = filled_cache(lengths, page=8, seed=3)
    kp, vp = cache.pages_view(0)
    table = cache.page_table(ids)
    chunks, rows = split_table(table, lengths, cache.page_size, splits)
    assert rows.reshape(len(ids), splits).sum(1).tolist() == lengths
    q = torch.randn(len(ids), TINY.num_attention_heads, TINY.head_dim, generator=torch.Generator().manual_seed(4))
    qs = q.repeat_interleave(splits, 0)
    # Each chunk is a row of the kernel's batch; empty chunks may give anything.
    plan = PagedPlan.build(chunks, [max(int(r), 1) for r in rows], [1] * len(rows), cache.page_size, CPU)
    o, lse = kernel.decode_paged(qs, kp, vp, plan)
    merged, merged_lse = merge_splits(o, lse, torch.from_numpy(rows), splits)
    for i, sid in enumerate(ids):
        o64, l64 = attention64(q[i : i + 1], *dense[sid], causal=False)
        torch.testing.assert_close(merged[i : i + 1].double(), o64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged_lse[:, i].double(), l64[:, 0], rtol=1e-4, atol=1e-5)


def test_split_table_chunks_are_whole_pages_in_order():
    table = np.array([[3, 9, 4, 7, 1, 0]], dtype=np.int32)
    chunks, rows = split_table(table, [37], page_size=8, splits=2, width=3)
    assert chunks.tolist() == [[3, 9, 4], [7, 1, 0]]  # 5 pages: 3 + 2, then the table's padding
    assert rows.tolist() == [24, 13]
