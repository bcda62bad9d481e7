"""Membership of a base's data-plane group: who the members are, and the epoch that binds them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemberInfo:
    member_id: int
    capacity_tokens: int
    node_ip: str


@dataclass(frozen=True)
class EpochSpec:
    """A data-plane membership: rank 0 is the base, rank i the i-th member of `members`."""

    epoch: int
    members: tuple[MemberInfo, ...]
    draining: frozenset[int] = frozenset()  # member ids that take no new sequences

    def active(self) -> list[MemberInfo]:
        """Members that take new sequences."""
        return [m for m in self.members if m.member_id not in self.draining]

    def rank_of(self, member_id: int) -> int:
        return 1 + [m.member_id for m in self.members].index(member_id)


@dataclass(frozen=True)
class JoinSpec:
    """What a pool member needs to join one base's data-plane group for one epoch."""

    base_id: int
    epoch: int
    store_host: str
    store_port: int
    rank: int
    world_size: int


def sum_counts(per_base: list[dict[int, int]]) -> dict[int, int]:
    """Live pooled sequences per member, summed over the bases' answers."""
    total: dict[int, int] = {}
    for counts in per_base:
        for mid, n in counts.items():
            total[mid] = total.get(mid, 0) + n
    return total
