"""The KV arena: regions first fit, merged when freed, writes land in the right rows."""
import pytest
import torch

from fapool.attention import ReferenceKernel
from fapool.config import TINY
from fapool.kvcache import KVCache


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
