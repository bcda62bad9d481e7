"""The KV arena: regions first fit, merged when freed, writes land in the right rows."""
import pytest
import torch

from fapool.attention import ReferenceKernel
from fapool.config import TINY
from fapool.pool.kv_store import KVCache


def test_regions_are_disjoint_and_merge_back():
    cache = KVCache(TINY, 100, torch.float32, torch.device("cpu"))
    a, b, c = cache.allocate("a", 30), cache.allocate("b", 30), cache.allocate("c", 40)
    assert (a.start, b.start, c.start) == (0, 30, 60) and not cache.can_allocate(1)
    cache.free("b")
    assert cache.can_allocate(30) and not cache.can_allocate(31)  # a hole of 30 between a and c
    cache.free("a")
    assert cache.can_allocate(60) and not cache.can_allocate(61)  # merged with its neighbour
    cache.free("c")
    assert cache.can_allocate(100) and cache.reserved_tokens == 0
    with pytest.raises(MemoryError):
        cache.allocate("d", 60)
        cache.allocate("e", 41)


def test_writes_land_in_the_sequences_region():
    cache = KVCache(TINY, 64, torch.float32, torch.device("cpu"))
    cache.allocate("x", 10)
    slab = cache.allocate("y", 20)
    k = torch.randn(5, TINY.num_key_value_heads, TINY.head_dim)
    slab.write(1, 3, k, -k)
    assert torch.equal(cache.arena[1, 0, 13:18], k) and torch.equal(slab.values(1, 8)[3:], -k)
    with pytest.raises(ValueError, match="overflow"):
        slab.write(0, 18, k, k)


def test_decode_varlen_default_matches_forward():
    kernel = ReferenceKernel()
    g = torch.Generator().manual_seed(0)
    arena_k = torch.randn(300, 2, 16, generator=g)
    arena_v = torch.randn(300, 2, 16, generator=g)
    q = torch.randn(3, 4, 16, generator=g)
    starts, lengths = [200, 0, 90], [50, 7, 100]
    out, lse = kernel.decode_varlen(q, arena_k, arena_v, starts, lengths)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        o, l = kernel.forward(q[i : i + 1], arena_k[s : s + n], arena_v[s : s + n], causal=False)
        torch.testing.assert_close(out[i : i + 1], o)
        torch.testing.assert_close(lse[:, i : i + 1], l)


def test_merge_stacked_equals_the_tree():
    from fapool.attention import merge_stacked, merge_tree

    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(6, 4, 16, generator=g), torch.randn(4, 6, generator=g) * 3) for _ in range(5)]
    parts[2] = (torch.zeros(6, 4, 16), torch.full((4, 6), float("-inf")))  # an empty shard
    o, lse = merge_stacked(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_o, ref_lse = merge_tree(parts)
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_row_allocator_places_where_told_and_refuses_overlaps():
    from fapool.pool.kv_store import RowAllocator

    rows = RowAllocator(100)
    assert rows.allocate("a", 30) == 0
    rows.place("b", 50, 20)  # leaves free [30, 50) and [70, 100)
    assert rows.can_allocate(30) and not rows.can_allocate(31)
    with pytest.raises(ValueError, match=r"rows \[40, 60\) are not free"):
        rows.place("c", 40, 20)
    assert rows.allocate("c", 25) == 70 and rows.allocate("d", 20) == 30
    assert rows.free("b") == (50, 20) and rows.reserved == 75
    assert rows.free("b") is None
    rows.free("d")
    assert rows.allocate("e", 40) == 30  # the freed neighbours merged into one region


def test_placing_over_a_stale_shard_of_the_same_owner_drops_it():
    cache = KVCache(TINY, 64, torch.float32, torch.device("cpu"))
    cache.place("0:1", 0, 16)
    cache.place("1:7", 16, 16)
    with pytest.raises(ValueError):  # without the owner's word, an overlap is refused
        cache.place("0:2", 4, 8)
    cache.place("0:2", 4, 8, stale_prefix="0:")  # base 0 gave up its shard 1 there
    assert "0:1" not in cache and cache.get("0:2").start == 4 and cache.reserved_tokens == 24
    with pytest.raises(ValueError):  # another base's shard is never dropped, nor the owner's then
        cache.place("0:3", 10, 8, stale_prefix="0:")
    assert "1:7" in cache and "0:2" in cache


def test_threads_placing_first_share_one_arena():
    # A pool member serves several bases from several threads; the first of them to place a shard
    # creates the arena, and every shard must live in that one (a second arena lost writes).
    import threading

    for _ in range(5):
        cache = KVCache(TINY.replace(num_hidden_layers=8), 1 << 14, torch.float32, torch.device("cpu"))
        barrier, slabs = threading.Barrier(8), []

        def place(i):
            barrier.wait()
            slabs.append(cache.place(f"{i}:1", i * 64, 32, stale_prefix=f"{i}:"))

        threads = [threading.Thread(target=place, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(slabs) == 8 and all(s.arena is cache.arena for s in slabs)
