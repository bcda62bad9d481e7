"""A base's shard placement on pool members: its own share of each arena, first fit, no overlap."""
import pytest

from fapool.pool.membership import MemberInfo
from fapool.pool.placement import ShardPlacement

M1, M2 = MemberInfo(1, 1000, "127.0.0.1"), MemberInfo(2, 600, "127.0.0.1")


def test_two_bases_place_in_disjoint_shares():
    b0, b1 = ShardPlacement(0, 2), ShardPlacement(1, 2)
    assert b0.quota(M1) == b1.quota(M1) == 500
    s0 = b0.place(7, [M1, M2], [200, 100])
    s1 = b1.place(7, [M1, M2], [200, 100])
    assert s0 == {1: 0, 2: 0} and s1 == {1: 500, 2: 300}  # base 1's share starts at its quota


def test_holes_count_and_released_rows_come_back():
    p = ShardPlacement(0, 1)
    p.place(1, [M2], [200])
    p.place(2, [M2], [200])
    p.place(3, [M2], [200])
    p.release([2])  # a hole of 200 in the middle, and nothing at the end
    assert p.fits([M2], [200]) and not p.fits([M2], [201])
    assert p.place(4, [M2], [150]) == {2: 200}
    p.release([1, 4])
    assert p.fits([M2], [400])  # the freed neighbours merged
    p.keep_only(set())  # the member left the group: a later one with its id starts empty
    assert p.fits([M2], [600])


def test_a_handle_is_placed_once_per_member():
    p = ShardPlacement(0, 1)
    p.place(1, [M1], [10])
    with pytest.raises(AssertionError):
        p.place(1, [M1], [10])
