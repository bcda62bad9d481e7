"""What the controller does with the policy's target: which draining members to revive, how many
to add, which to drain, and which drained ones to remove.

Pure (no Ray), so `actors/controller.py` and the `bench.elastic` replay run the same decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Collection, Mapping


class RemovalCause(Enum):
    """Why members leave the pool."""

    DRAINED = "drained"  # healthy and idle: it may stay started as a warm standby
    DIED = "died"  # gone: nothing to keep

    @property
    def may_stay_warm(self) -> bool:
        return self is RemovalCause.DRAINED


@dataclass(frozen=True)
class MembershipPlan:
    revive: tuple[int, ...] = ()  # draining members made active again (cheaper than adding)
    add: int = 0  # new members to start (or take from the warm standby)
    drain: tuple[int, ...] = ()  # active members that take no new sequences from now on


def num_active(members: Collection[int], draining: Collection[int]) -> int:
    return sum(1 for m in members if m not in draining)


def plan_membership(target: int, members: Collection[int], draining: Collection[int],
                    seqs: Mapping[int, int]) -> MembershipPlan:
    """Reach `target` active members; `seqs` (live sequences per member) is only read to shrink."""
    active = [m for m in members if m not in draining]
    if target > len(active):
        revive = tuple(sorted(draining)[: target - len(active)])
        return MembershipPlan(revive=revive, add=target - len(active) - len(revive))
    if target < len(active):
        # Drain the members holding the fewest sequences, the newest first on ties.
        pick = sorted(active, key=lambda m: (seqs.get(m, 0), -m))[: len(active) - target]
        return MembershipPlan(drain=tuple(pick))
    return MembershipPlan()


def removable(draining: Collection[int], seqs: Mapping[int, int]) -> tuple[int, ...]:
    """Draining members no live sequence holds KV on: removing them loses nothing."""
    return tuple(sorted(m for m in draining if seqs.get(m, 0) == 0))
