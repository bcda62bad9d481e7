"""The pool's split/merge math equals unsplit attention: query blocks, KV shards, LSE merges."""

from __future__ import annotations

import math

import pytest
import torch

from fapool.attention import (
    ReferenceKernel,
    decode_partial,
    kv_shards,
    merge,
    merge_tree,
    prefill_block,
    query_blocks,
    shard_partial,
    split_decode,
    split_prefill,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
KERNEL = ReferenceKernel()


def naive_attention(q, k, v, causal, scale=None):
    """Float64 softmax(scale * QK^T)V with bottom-right causal mask, one head at a time."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    lse = torch.full((hq, tq), -math.inf, dtype=torch.float64)
    for h in range(hq):
        kh = k[:, h // (hq // hkv)].double()
        vh = v[:, h // (hq // hkv)].double()
        for i in range(tq):
            visible = tk - tq + i + 1 if causal else tk
            if visible <= 0:
                continue
            s = (q[i, h].double() @ kh[:visible].T) * scale
            lse[h, i] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ vh[:visible]
    return out, lse


def rand_qkv(tq, tk, hq, hkv, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tq, hq, d, generator=g),
        torch.randn(tk, hkv, d, generator=g),
        torch.randn(tk, hkv, d, generator=g),
    )


def assert_matches(result, expected, tol=TOL):
    (o, lse), (o_ref, lse_ref) = result, expected
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, **tol)
    torch.testing.assert_close(lse.double(), lse_ref, **tol)


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2), (4, 1)])
def test_merge_of_disjoint_key_sets_equals_attention_over_union(hq, hkv):
    q, k, v = rand_qkv(5, 23, hq, hkv, seed=1)
    cut = 9
    a = KERNEL.forward(q, k[:cut], v[:cut], causal=False)
    b = KERNEL.forward(q, k[cut:], v[cut:], causal=False)
    assert_matches(merge(*a, *b), naive_attention(q, k, v, causal=False))


def test_merge_with_an_empty_side_returns_the_other_side():
    q, k, v = rand_qkv(4, 10, 2, 2, seed=2)
    full = KERNEL.forward(q, k, v, causal=False)
    empty = KERNEL.forward(q, k[:0], v[:0], causal=False)
    assert torch.all(empty[0] == 0) and torch.all(torch.isneginf(empty[1]))
    for o, lse in (merge(*full, *empty), merge(*empty, *full)):
        torch.testing.assert_close(o, full[0], rtol=0, atol=0)
        torch.testing.assert_close(lse, full[1], rtol=0, atol=0)


def test_merge_of_two_empty_sides_is_empty_without_nan():
    o = torch.zeros(3, 2, 4)
    lse = torch.full((2, 3), -math.inf)
    o_m, lse_m = merge(o, lse, o, lse)
    assert not torch.isnan(o_m).any() and torch.all(o_m == 0)
    assert torch.all(torch.isneginf(lse_m))


def test_merge_keeps_the_output_dtype_and_computes_in_float32():
    q, k, v = rand_qkv(3, 12, 2, 2, seed=3)
    a = KERNEL.forward(q.bfloat16(), k[:5].bfloat16(), v[:5].bfloat16(), causal=False)
    b = KERNEL.forward(q.bfloat16(), k[5:].bfloat16(), v[5:].bfloat16(), causal=False)
    o, lse = merge(*a, *b)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o_ref, lse_ref = naive_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=False)
    torch.testing.assert_close(o.double(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_parts", [1, 2, 3, 5, 8, 13])
def test_merge_tree_equals_attention_over_all_parts(num_parts):
    q, k, v = rand_qkv(3, 40, 4, 2, seed=num_parts)
    cuts = kv_shards(40, num_parts)
    partials = [KERNEL.forward(q, k[s:e], v[s:e], causal=False) for s, e in cuts]
    assert_matches(merge_tree(partials), naive_attention(q, k, v, causal=False))


def test_merge_tree_merges_neighbours_level_by_level():
    q, k, v = rand_qkv(2, 15, 2, 1, seed=4)
    p = [KERNEL.forward(q, k[s:e], v[s:e], causal=False) for s, e in kv_shards(15, 5)]
    # ((p0 p1)(p2 p3)) p4: the exact association order of a hierarchical reduction.
    expected = merge(*merge(*merge(*p[0], *p[1]), *merge(*p[2], *p[3])), *p[4])
    o, lse = merge_tree(p)
    assert torch.equal(o, expected[0]) and torch.equal(lse, expected[1])


def test_merge_tree_rejects_no_partials():
    with pytest.raises(ValueError, match="at least one"):
        merge_tree([])


# ---------------------------------------------------------------- query blocks and shards


def causal_work(ranges):
    return sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in ranges)  # keys seen by rows s..e-1


@pytest.mark.parametrize("scheme", ["zigzag", "contiguous"])
def test_query_blocks_are_disjoint_ordered_and_cover_all_rows(scheme):
    for n in list(range(0, 70)) + [257, 1000]:
        for parts in range(1, 34):
            blocks = query_blocks(n, parts, scheme)
            assert len(blocks) == parts
            rows = [r for ranges in blocks for s, e in ranges for r in range(s, e)]
            assert sorted(rows) == list(range(n)), (n, parts)  # disjoint and covering
            for ranges in blocks:
                assert all(e > s for s, e in ranges)
                assert ranges == sorted(ranges)
                assert len(ranges) <= (2 if scheme == "zigzag" else 1)


def test_contiguous_blocks_are_a_ceil_split():
    assert query_blocks(10, 4, "contiguous") == [[(0, 3)], [(3, 6)], [(6, 9)], [(9, 10)]]
    assert query_blocks(2, 4, "contiguous") == [[(0, 1)], [(1, 2)], [], []]


def test_zigzag_pairs_block_i_with_block_2p_minus_1_minus_i():
    assert query_blocks(8, 2) == [[(0, 2), (6, 8)], [(2, 6)]]
    assert query_blocks(12, 3) == [[(0, 2), (10, 12)], [(2, 4), (8, 10)], [(4, 8)]]
    assert query_blocks(1, 3) == [[(0, 1)], [], []]  # the single row is block 5, part 0's


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    for parts in range(2, 33):
        for n in (16 * parts, 16 * parts + 5, 1000, 4099):
            zig = [causal_work(r) for r in query_blocks(n, parts, "zigzag")]
            mean = sum(zig) / parts
            assert max(zig) <= 1.15 * mean, (n, parts, max(zig) / mean)
        contiguous = [causal_work(r) for r in query_blocks(4096, parts, "contiguous")]
        assert max(contiguous) >= 1.4 * sum(contiguous) / parts  # why zigzag exists


def test_kv_shards_are_contiguous_and_near_equal():
    for n in range(0, 80):
        for parts in range(1, 34):
            shards = kv_shards(n, parts)
            assert len(shards) == parts and shards[0][0] == 0 and shards[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
            sizes = [e - s for s, e in shards]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("parts", [0, 34, -1, 100])
def test_bad_part_counts_are_rejected_with_the_value_and_range(parts):
    for call in (lambda: query_blocks(10, parts), lambda: kv_shards(10, parts)):
        with pytest.raises(ValueError, match=rf"parts={parts}.*1\.\.33"):
            call()


def test_negative_lengths_and_unknown_schemes_are_rejected():
    with pytest.raises(ValueError, match="n=-1"):
        query_blocks(-1, 2)
    with pytest.raises(ValueError, match="n=-3"):
        kv_shards(-3, 2)
    with pytest.raises(ValueError, match="'striped'.*zigzag"):
        query_blocks(10, 2, "striped")


# ---------------------------------------------------------------- prefill by query blocks


@pytest.mark.parametrize("s,e", [(0, 1), (0, 17), (5, 6), (3, 17), (16, 17), (9, 12)])
def test_prefill_block_equals_the_rows_of_full_causal_attention(s, e):
    q, k, v = rand_qkv(17, 17, 4, 2, seed=5)
    o_ref, lse_ref = naive_attention(q, k, v, causal=True)
    result = prefill_block(KERNEL, q[s:e], k[:e], v[:e])
    assert_matches(result, (o_ref[s:e], lse_ref[:, s:e]))


@pytest.mark.parametrize("scheme", ["zigzag", "contiguous"])
def test_split_prefill_equals_unsplit_for_every_part_count(scheme):
    q, k, v = rand_qkv(45, 45, 4, 2, seed=6)
    expected = naive_attention(q, k, v, causal=True)
    unsplit = KERNEL.forward(q, k, v, causal=True)
    assert_matches(unsplit, expected)
    for parts in range(1, 34):
        assert_matches(split_prefill(KERNEL, q, k, v, parts, scheme), expected)


@pytest.mark.parametrize("scheme", ["zigzag", "contiguous"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("n", [1, 2, 5, 31])
def test_split_prefill_with_more_parts_than_rows_and_gqa(scheme, hq, hkv, n):
    q, k, v = rand_qkv(n, n, hq, hkv, seed=7 + n)
    expected = naive_attention(q, k, v, causal=True)
    for parts in (1, 3, 8, 32):
        assert_matches(split_prefill(KERNEL, q, k, v, parts, scheme), expected)


def test_split_prefill_passes_the_scale_through():
    q, k, v = rand_qkv(12, 12, 2, 1, seed=8)
    assert_matches(split_prefill(KERNEL, q, k, v, 3, scale=0.17),
                   naive_attention(q, k, v, causal=True, scale=0.17))


def test_split_prefill_rejects_cross_attention():
    q, k, v = rand_qkv(4, 6, 2, 2)
    with pytest.raises(ValueError, match="self-attention"):
        split_prefill(KERNEL, q, k, v, 2)


# ---------------------------------------------------------------- decode by KV shards


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2), (8, 2)])
def test_split_decode_of_one_token_equals_unsplit_for_every_part_count(hq, hkv):
    q, k, v = rand_qkv(1, 20, hq, hkv, seed=9)
    expected = naive_attention(q, k, v, causal=True)
    assert_matches(KERNEL.forward(q, k, v, causal=True), expected)
    for parts in range(1, 34):  # parts > 20 leaves empty shards, which must merge as nothing
        assert_matches(split_decode(KERNEL, q, k, v, parts), expected)


@pytest.mark.parametrize("tq,tk", [(2, 9), (7, 30), (12, 12), (5, 6), (9, 40)])
def test_split_decode_of_several_tokens_applies_the_causal_diagonal(tq, tk):
    q, k, v = rand_qkv(tq, tk, 4, 2, seed=10 + tq)
    expected = naive_attention(q, k, v, causal=True)
    for parts in (1, 2, 3, 4, 7, 16, 32):  # shards shorter than Tq split the query rows
        assert_matches(split_decode(KERNEL, q, k, v, parts), expected)


def test_shard_partial_of_a_shard_after_the_queries_contributes_nothing_to_early_rows():
    q, k, v = rand_qkv(6, 10, 2, 2, seed=11)
    o, lse = shard_partial(KERNEL, q, k, v, 7, 10)  # positions 4..9; shard keys 7..9
    assert torch.all(torch.isneginf(lse[:, :3])) and torch.all(o[:3] == 0)
    assert torch.isfinite(lse[:, 3:]).all()


def test_decode_partial_is_non_causal_over_its_shard():
    q, k, v = rand_qkv(3, 14, 4, 2, seed=12)
    assert_matches(decode_partial(KERNEL, q, k[4:9], v[4:9]),
                   naive_attention(q, k[4:9], v[4:9], causal=False))
    o, lse = decode_partial(KERNEL, q, k[:0], v[:0])
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_split_decode_rejects_kv_without_the_new_tokens():
    q, k, v = rand_qkv(5, 3, 2, 2)
    with pytest.raises(ValueError, match="already include the new tokens"):
        split_decode(KERNEL, q, k, v, 2)
