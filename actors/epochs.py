"""The controller's side of the data-plane protocol with the bases: forming a membership epoch
(prepare on every base, members join, commit between two steps) and asking where pooled
sequences live."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fapool.pool.membership import EpochSpec, JoinSpec, MemberInfo, sum_counts


@dataclass
class Member:
    handle: Any
    info: MemberInfo


async def form_epoch(bases: dict[int, Any], epoch: int, members: dict[int, Member], draining: set[int]) -> None:
    """Build the group of `epoch` for every base (by base id) with these members. Members join
    each base's group in the background; a base's commit completes the rendezvous."""
    spec = EpochSpec(epoch, tuple(m.info for _, m in sorted(members.items())), frozenset(draining))
    addrs = await asyncio.gather(*(b.prepare_epoch.remote(spec) for b in bases.values()))
    for base_id, (host, port) in zip(bases, addrs):
        for rank, info in enumerate(spec.members, start=1):
            members[info.member_id].handle.join.remote(
                JoinSpec(base_id, spec.epoch, host, port, rank, 1 + len(spec.members)))
    await asyncio.gather(*(b.commit_epoch.remote(spec.epoch) for b in bases.values()))


async def push_draining(bases: list[Any], draining: set[int]) -> dict[int, int]:
    """Tell every base which members take no new sequences; returns live sequences per member."""
    return sum_counts(await asyncio.gather(*(b.set_draining.remote(frozenset(draining)) for b in bases)))


async def seqs_per_member(bases: list[Any]) -> dict[int, int]:
    return sum_counts(await asyncio.gather(*(b.seqs_per_member.remote() for b in bases)))
