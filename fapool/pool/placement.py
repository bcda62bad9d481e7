"""Where a base's shards sit on its pool members.

Each base owns an equal share of every member's KV arena (rows [base_id * quota, (base_id + 1) *
quota)) and places its shards there itself, first fit over what it knows is free. So a shard
is only sent where one contiguous region can take it (a member never has to refuse one and
break the group), and the members need no allocator of their own for pooled KV.
"""
from __future__ import annotations

from fapool.pool.membership import MemberInfo
from fapool.pool.kv_store import RowAllocator


class ShardPlacement:
    def __init__(self, base_id: int, num_bases: int) -> None:
        self.base_id = base_id
        self.num_bases = num_bases
        self._rows: dict[int, RowAllocator] = {}  # member id -> this base's share there

    def quota(self, m: MemberInfo) -> int:
        """Rows of member `m` that are this base's to fill."""
        return m.capacity_tokens // self.num_bases

    def _share(self, m: MemberInfo) -> RowAllocator:
        rows = self._rows.get(m.member_id)
        if rows is None:
            rows = self._rows[m.member_id] = RowAllocator(self.quota(m))
        return rows

    def fits(self, members: list[MemberInfo], rows: list[int]) -> bool:
        """Whether member i can take a shard of rows[i] rows now, for every i."""
        return all(self._share(m).can_allocate(r) for m, r in zip(members, rows))

    def place(self, handle: int, members: list[MemberInfo], rows: list[int]) -> dict[int, int]:
        """Hold the rows of `handle`'s shards; returns each member's first arena row."""
        return {m.member_id: self.base_id * self.quota(m) + self._share(m).allocate(_key(handle), r)
                for m, r in zip(members, rows)}

    def release(self, handles: list[int]) -> None:
        """The members dropped these shards (or will before anything else reaches them)."""
        for share in self._rows.values():
            for handle in handles:
                share.free(_key(handle))

    def usage(self) -> tuple[tuple[int, int, int], ...]:
        """(member id, rows this base holds there, this base's share) for each member it used."""
        return tuple((mid, share.reserved, share.capacity) for mid, share in sorted(self._rows.items()))

    def keep_only(self, member_ids: set[int]) -> None:
        """Members gone from the group take this base's placements on them along."""
        self._rows = {mid: share for mid, share in self._rows.items() if mid in member_ids}


def _key(handle: int) -> str:
    return f"h{handle}"
