"""The base's attention executor: short sequences stay local, long ones go to the pool.

A pooled sequence is split into `1 + members` parts by zigzag query blocks; part 0 is the base's
own (so the base GPU shares the attention work instead of idling), parts 1.. live on pool members.
After prefill each part keeps the K, V rows of its blocks; decode steps send q to every member,
each returns (out, lse) over its shard, and the base merges them with its own part (its prefill
rows plus every generated token) in an LSE tree. The base computes its part and its local
sequences while the members work.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fapool.attention import AttentionKernel, query_blocks
from fapool.step_batch import StepBatch
from fapool.config import ModelConfig
from fapool.executor import AttentionExecutor, LocalAttention, Placement
from fapool.paged_cache import PagedKVCache
from fapool.policy import PolicyConfig, pool_size
from fapool.pool.membership import EpochSpec
from fapool.pool.placement import ShardPlacement
from fapool.pool.protocol import OP_DECODE, OP_FREE, OP_PREFILL, OP_STOP, encode_prefill, rows_of
from fapool.pool.step import PooledSeq, PooledStep, decode_layer, plan_step, prefill_layer
from fapool.pool.transport import DataPlane, PoolFailure, guard
from fapool.profiling import PhaseTimer


@dataclass(frozen=True)
class PoolStats:
    """The executor's view of the pool, for the base's stats and reports."""

    epoch: int
    pooled: int  # running sequences whose KV is spread over the pool
    pooled_total: int  # sequences ever admitted to the pool
    step_pooled: int  # pooled sequences in the latest step
    members_kv: tuple[tuple[int, int, int], ...]  # (member id, rows held there, this base's share)


class PooledAttention(AttentionExecutor):
    def __init__(
        self,
        cfg: ModelConfig,
        cache: PagedKVCache,
        kernel: AttentionKernel,
        policy: PolicyConfig,
        num_bases: int = 1,
        pool_wait_s: float = 30.0,
        profile: bool = False,
        base_id: int = 0,
    ) -> None:
        self.cfg = cfg
        self.timer = PhaseTimer(cache.device, profile)
        self.local = LocalAttention(cache, kernel, self.timer)
        self.cache, self.kernel = cache, kernel
        self._policy = policy
        self.placement = ShardPlacement(base_id, num_bases)  # members' arenas shared evenly between bases
        self.pool_wait_s = pool_wait_s
        self.plane: DataPlane | None = None
        self._spec = EpochSpec(0, ())
        self._capacity = policy.max_pool  # members the cluster can give, from the controller
        self.pooled: dict[str, PooledSeq] = {}
        self._pooled_total = 0
        self._orphans: list[int] = []  # handles whose shards may survive on members: freed next epoch
        self._broken: str | None = None
        self._step: PooledStep | None = None
        self._step_pooled = 0
        self._handles = itertools.count(1)

    @property
    def threshold(self) -> int:
        """The shortest prompt that goes to the pool."""
        return self._policy.curve.threshold

    @property
    def epoch(self) -> int:
        return self._spec.epoch

    def stats(self) -> PoolStats:
        return PoolStats(self._spec.epoch, len(self.pooled), self._pooled_total, self._step_pooled,
                         self.placement.usage())

    # ---- control (from the base's engine thread, between steps) ----------------------------
    def set_policy(self, policy: PolicyConfig) -> None:
        self._policy = policy

    def set_capacity(self, capacity: int) -> None:
        """How many members the cluster can give: a long prompt waits only for a pool that can come."""
        self._capacity = capacity

    def set_draining(self, member_ids: frozenset[int]) -> dict[int, int]:
        """Place nothing new on these members; returns live pooled sequences per member."""
        self._spec = EpochSpec(self._spec.epoch, self._spec.members, frozenset(member_ids))
        return self.seqs_per_member()

    # ---- membership ------------------------------------------------------------------------
    def switch_epoch(self, spec: EpochSpec, plane: DataPlane | None) -> list[str]:
        """Retire the old group and adopt a new one. Returns pooled sequences that lost a holder."""
        self.retire_plane()
        self._spec, self.plane = spec, plane
        alive = {m.member_id for m in spec.members}
        if plane is not None:
            if self._orphans:
                # Shards of requests recomputed after a failure may survive on healthy members.
                plane.send_header(OP_FREE, torch.tensor(self._orphans, dtype=torch.int64))
                self.placement.release(self._orphans)
                self._orphans = []
            self.placement.keep_only(alive)
        return [sid for sid, p in self.pooled.items() if not set(p.member_ids) <= alive]

    def abandon(self) -> list[str]:
        """The group broke: drop it. Returns the pooled sequences, to be prefilled again; freeing
        them (with no group) turns their shards into orphans, freed through the next group."""
        self.switch_epoch(EpochSpec(self._spec.epoch, ()), None)
        return list(self.pooled)

    def retire_plane(self) -> None:
        if self.plane is not None:
            try:
                self.plane.send_header(OP_STOP, torch.empty(0, dtype=torch.int64))
            except Exception:  # noqa: BLE001 - a broken group cannot be stopped politely
                pass
            self.plane.close()
            self.plane = None

    def seqs_per_member(self) -> dict[int, int]:
        counts = {m.member_id: 0 for m in self._spec.members}
        for p in self.pooled.values():
            for mid in p.member_ids:
                counts[mid] = counts.get(mid, 0) + 1
        return counts

    # ---- capacity --------------------------------------------------------------------------
    def max_seq_tokens(self) -> int:
        pooled = sum(self.placement.quota(m) for m in self._spec.active())
        return max(self.local.max_seq_tokens(), self.cache.capacity_tokens + pooled) if pooled \
            else self.local.max_seq_tokens()

    def plan(self, seq_id: str, num_prompt: int, waited_s: float, cached_rows: int = 0) -> Placement | None:
        """Parts 1.. on the active members where they all fit now (the base keeps part 0, with
        room for the first generated token), else every row local. None while the pool is growing
        for this prompt and it has waited less than `pool_wait_s`: rather than run on fewer
        members, it waits aside (others run meanwhile)."""
        if cached_rows and num_prompt - cached_rows < self.threshold:
            # Its prefix is cached on this base and the rest is short: prefill the rest here. A
            # pooled prompt is prefilled whole (its base share is no prefix), the hit unused.
            return Placement(num_prompt, num_prompt)
        members = self._spec.active()
        if waited_s < self.pool_wait_s and pool_size(num_prompt, self._capacity, self._policy) > len(members):
            return None
        if num_prompt >= self.threshold and members and self.plane is not None:
            blocks = query_blocks(num_prompt, 1 + len(members))
            rows = [sum(e - s for s, e in b) for b in blocks]
            if self.placement.fits(members, rows[1:]):
                return Placement(rows[0], rows[0] + 1, (tuple(members), tuple(rows[1:])))
        return Placement(num_prompt, num_prompt)

    def place(self, seq_id: str, placement: Placement) -> None:
        if placement.shards is None:
            return
        members, rows = placement.shards
        handle = next(self._handles)
        starts = self.placement.place(handle, list(members), list(rows))
        self.pooled[seq_id] = PooledSeq(handle, tuple(starts), starts)
        self._pooled_total += 1

    def prefill_whole(self, seq_id: str) -> bool:
        return seq_id in self.pooled

    def graph_safe(self, batch: StepBatch) -> bool:
        return not any(s.seq_id in self.pooled for s in batch.slices)

    def phase_times(self) -> tuple[tuple[str, float], ...]:
        return self.local.phase_times()

    def release(self, seq_id: str) -> None:
        p = self.pooled.pop(seq_id, None)
        if p is None:
            return
        if self.plane is None:
            self._orphans.append(p.handle)  # its rows stay placed until the members hear of it
            return
        try:
            self.plane.send_header(OP_FREE, torch.tensor([p.handle], dtype=torch.int64))
        except Exception as e:  # noqa: BLE001 - raise at the next step, not amid this step's outputs
            self._orphans.append(p.handle)
            self._broken = f"freeing a shard failed: {e}"
            return
        self.placement.release([p.handle])

    # ---- the step --------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> None:
        if self._broken:
            reason, self._broken = self._broken, None
            raise PoolFailure(reason)
        if not any(s.seq_id in self.pooled for s in batch.slices):
            # All local: the local executor's step, whose plan is made at the first `attend` (a
            # captured decode step never needs one; making it anyway costs the host a blocking copy).
            self._step, self._step_pooled = None, 0
            self.local.begin_step(batch)
            return
        step = self._step = plan_step(batch, self.pooled, self._spec, self.local, self.cfg, self.plane)
        self._step_pooled = len(step.pooled_idx)
        plane = self.plane
        if step.prefill is not None:
            op, body = OP_PREFILL, encode_prefill(list(step.prefill.items))
        else:
            op, body = OP_DECODE, [self.pooled[batch.slices[i].seq_id].handle for i in step.pooled_idx]
        guard(lambda: plane.send_header(op, torch.tensor(body, dtype=torch.int64)))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        step = self._step
        if step is None:
            return self.local.attend(layer, q, k, v)
        out = torch.empty_like(q)
        pending = None
        if step.prefill is not None:
            pending = prefill_layer(step, self.plane, self.kernel, self.local, self.timer, layer, q, k, v, out)
        elif step.decode is not None:
            pending = decode_layer(step, self.plane, self.local, self.timer, layer, q, k, v, out)
        # Local sequences overlap with the members' work.
        with self.timer.phase("attention"):
            if step.local_plan is not None:
                rows = step.local_rows
                out[rows] = self.local.attend_rows(layer, step.local_plan, q[rows], k[rows], v[rows])[0]
        if pending is not None:
            guard(pending)
        return out

    def end_step(self) -> None:
        step = self._step
        if step is None:
            self.local.end_step()
            return
        for i, s in enumerate(step.batch.slices):
            slab = self.cache.get(s.seq_id)
            if s.seq_id not in self.pooled:
                slab.length = s.end
            elif step.prefill is not None:
                slab.length = rows_of([step.prefill.items[step.pooled_idx.index(i)]], 0)
            else:
                slab.length += 1
        self._step = None
