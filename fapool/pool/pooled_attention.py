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
import time
from dataclasses import dataclass

import numpy as np
import torch

from fapool.attention import AttentionKernel, prefill_block, query_blocks
from fapool.attention.merge import merge_stacked
from fapool.batch import StepBatch
from fapool.config import ModelConfig
from fapool.executor import AttentionExecutor, LocalAttention
from fapool.paged_cache import PagedKVCache
from fapool.policy import PolicyConfig, pool_size
from fapool.pool.membership import EpochSpec, MemberInfo
from fapool.pool.protocol import (
    OP_DECODE,
    OP_FREE,
    OP_PREFILL,
    OP_STOP,
    TAG_OUT,
    PartLayout,
    PrefillItem,
    encode_prefill,
    rows_of,
)
from fapool.pool.placement import ShardPlacement
from fapool.pool.transport import DataPlane
from fapool.profiling import PhaseTimer


class PoolFailure(RuntimeError):
    """The data plane broke mid-step (a member died or timed out)."""


@dataclass
class PooledSeq:
    handle: int
    member_ids: tuple[int, ...]  # holders of parts 1..; part 0 is the base
    starts: dict[int, int]  # member id -> first arena row of its shard there


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
        self.policy = policy
        self.placement = ShardPlacement(base_id, num_bases)  # members' arenas shared evenly between bases
        self.pool_wait_s = pool_wait_s
        self.plane: DataPlane | None = None
        self.spec = EpochSpec(0, ())
        self.capacity_hint = policy.max_pool  # members the cluster can give, from the controller
        self.pooled: dict[str, PooledSeq] = {}
        self.pooled_total = 0
        self.orphans: list[int] = []  # handles whose shards may survive on members: freed next epoch
        self._broken: str | None = None
        self.step_pooled = 0  # pooled sequences in the latest step
        self._handles = itertools.count(1)
        self._deferred_since: dict[str, float] = {}
        self._batch: StepBatch | None = None
        self._offsets: list[int] = []

    @property
    def threshold(self) -> int:
        """The shortest prompt that goes to the pool."""
        return self.policy.curve.threshold

    # ---- membership ------------------------------------------------------------------------
    def active_members(self) -> list[MemberInfo]:
        return [m for m in self.spec.members if m.member_id not in self.spec.draining]

    def rank_of(self, member_id: int) -> int:
        return 1 + [m.member_id for m in self.spec.members].index(member_id)

    def switch_epoch(self, spec: EpochSpec, plane: DataPlane | None) -> list[str]:
        """Retire the old group and adopt a new one. Returns pooled sequences that lost a holder."""
        self.retire_plane()
        self.spec, self.plane = spec, plane
        alive = {m.member_id for m in spec.members}
        if plane is not None:
            if self.orphans:
                # Shards of requests recomputed after a failure may survive on healthy members.
                plane.send_header(OP_FREE, torch.tensor(self.orphans, dtype=torch.int64))
                self.placement.release(self.orphans)
                self.orphans = []
            self.placement.keep_only(alive)
        return [sid for sid, p in self.pooled.items() if not set(p.member_ids) <= alive]

    def abandon(self) -> list[str]:
        """The group broke: drop it. Returns the pooled sequences, to be prefilled again; freeing
        them (with no group) turns their shards into orphans, freed through the next group."""
        self.switch_epoch(EpochSpec(self.spec.epoch, ()), None)
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
        counts = {m.member_id: 0 for m in self.spec.members}
        for p in self.pooled.values():
            for mid in p.member_ids:
                counts[mid] = counts.get(mid, 0) + 1
        return counts

    # ---- capacity --------------------------------------------------------------------------
    def max_seq_tokens(self) -> int:
        pooled = sum(self.placement.quota(m) for m in self.active_members())
        return max(self.local.max_seq_tokens(), self.cache.capacity_tokens + pooled) if pooled \
            else self.local.max_seq_tokens()

    def _plan(self, num_prompt: int, num_tokens: int) -> tuple[list[MemberInfo], list[int]] | None:
        """Members for parts 1.. and the rows of every part, if they all fit now."""
        members = self.active_members()
        if num_prompt < self.threshold or not members or self.plane is None:
            return None
        blocks = query_blocks(num_prompt, 1 + len(members))
        rows = [sum(e - s for s, e in b) for b in blocks]
        if not self.placement.fits(members, rows[1:]):
            return None
        if not self.cache.can_allocate(rows[0] + 1):
            return None
        return members, rows

    def can_allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> bool:
        if pool_size(num_prompt, self.capacity_hint, self.policy) > len(self.active_members()):
            # The pool is growing for this prompt: wait for it a while rather than run it on fewer.
            since = self._deferred_since.setdefault(seq_id, time.monotonic())
            if time.monotonic() - since < self.pool_wait_s:
                return False
        return self._plan(num_prompt, num_tokens) is not None or self.cache.can_allocate(num_prompt)

    def allocate(self, seq_id: str, num_prompt: int, num_tokens: int) -> None:
        self._deferred_since.pop(seq_id, None)
        plan = self._plan(num_prompt, num_tokens)
        if plan is None:
            self.local.allocate(seq_id, num_prompt, num_tokens)
            return
        members, rows = plan
        self.cache.allocate(seq_id, rows[0])  # the base's own rows; generated tokens add pages
        handle = next(self._handles)
        starts = self.placement.place(handle, members, rows[1:])
        self.pooled[seq_id] = PooledSeq(handle, tuple(starts), starts)
        self.pooled_total += 1

    def grow(self, seq_id: str, num_new: int) -> bool:
        return self.local.grow(seq_id, num_new)

    def prefill_whole(self, seq_id: str) -> bool:
        return seq_id in self.pooled

    def graph_safe(self, batch: StepBatch) -> bool:
        return not any(s.seq_id in self.pooled for s in batch.slices)

    def kv_usage(self) -> tuple[int, int]:
        return self.local.kv_usage()

    def free(self, seq_id: str) -> None:
        self._deferred_since.pop(seq_id, None)
        self.cache.free(seq_id)
        p = self.pooled.pop(seq_id, None)
        if p is None:
            return
        if self.plane is None:
            self.orphans.append(p.handle)  # its rows stay placed until the members hear of it
            return
        try:
            self.plane.send_header(OP_FREE, torch.tensor([p.handle], dtype=torch.int64))
        except Exception as e:  # noqa: BLE001 - raise at the next step, not amid this step's outputs
            self.orphans.append(p.handle)
            self._broken = f"freeing a shard failed: {e}"
            return
        self.placement.release([p.handle])

    # ---- the step --------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> None:
        if self._broken:
            reason, self._broken = self._broken, None
            raise PoolFailure(reason)
        self._batch = batch
        self._offsets = batch.offsets()
        self._pooled_idx = [i for i, s in enumerate(batch.slices) if s.seq_id in self.pooled]
        self.step_pooled = len(self._pooled_idx)
        self._local_idx = [i for i, s in enumerate(batch.slices) if s.seq_id not in self.pooled]
        dev = self.cache.device
        local = [batch.slices[i] for i in self._local_idx]
        self._local_plan = self.local.rows_plan([s.seq_id for s in local], [s.start for s in local],
                                                [s.end for s in local]) if local else None
        # The flat token rows of the local sequences (one a sequence at decode).
        offs = self._offsets
        self._local_rows = torch.tensor([t for i in self._local_idx for t in range(offs[i], offs[i + 1])],
                                        dtype=torch.long).to(dev)
        if batch.kind == "decode":
            ids = [batch.slices[i].seq_id for i in self._pooled_idx]
            lens = [self.cache.get(sid).length for sid in ids]
            # A pooled sequence's base rows hold its prefill part, then every generated token.
            self._pool_plan = self.local.rows_plan(ids, lens, [n + 1 for n in lens]) if ids else None
            self._pool_rows = torch.tensor(self._pooled_idx, device=dev)
            if self._pooled_idx and self.plane is not None:
                # The exchange buffers of every layer (each layer's gather has finished on the
                # stream before the next layer writes them again).
                cfg = self.cfg
                self._layout = PartLayout(len(self._pooled_idx), cfg.num_attention_heads, cfg.head_dim,
                                          self.cache.dtype)
                self._mine = self._layout.empty(1, dev)
                self._parts = self._layout.empty(self.plane.world_size, dev)
        if not self._pooled_idx:
            return
        assert self.plane is not None, "pooled sequences without a data plane"
        seqs = [self.pooled[batch.slices[i].seq_id] for i in self._pooled_idx]
        if batch.kind == "prefill":
            items = [
                PrefillItem(p.handle, batch.slices[i].num_tokens, (0, *map(self.rank_of, p.member_ids)),
                            (0, *(p.starts[mid] for mid in p.member_ids)))
                for i, p in zip(self._pooled_idx, seqs)
            ]
            self._items = items
            # Where the base's own rows of each pooled prompt go: its blocks, in order.
            toks = [self._offsets[i] + t for i, it in zip(self._pooled_idx, items)
                    for s, e in it.ranges_of(0) for t in range(s, e)]
            slots = [self.cache.slots(p.seq_id, 0, rows_of([it], 0)) for p, it in
                     zip((batch.slices[i] for i in self._pooled_idx), items)]
            self._base_tok = torch.tensor(toks, dtype=torch.long).to(dev)
            self._base_slots = torch.from_numpy(np.concatenate(slots)).to(dev)
            body = [*encode_prefill(items)]
            op = OP_PREFILL
        else:
            body = [p.handle for p in seqs]
            op = OP_DECODE
        self._guard(lambda: self.plane.send_header(op, torch.tensor(body, dtype=torch.int64)))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None
        out = torch.empty_like(q)
        pending = self._exchange(layer, q, k, v, out) if self._pooled_idx else None
        # Local sequences overlap with the members' work.
        with self.timer.phase("attention"):
            if self._local_plan is not None:
                rows = self._local_rows
                out[rows] = self.local.attend_rows(layer, self._local_plan, q[rows], k[rows], v[rows])[0]
        if pending is not None:
            self._guard(pending)
        return out

    def _exchange(self, layer: int, q, k, v, out: torch.Tensor):
        """Send this layer's pooled work, compute the base's part; returns the finishing step."""
        if self._batch.kind == "prefill":
            return self._prefill_layer(layer, q, k, v, out)
        return self._decode_layer(layer, q, k, v, out)

    def _prefill_layer(self, layer: int, q, k, v, out: torch.Tensor):
        slices, offs, plane = self._batch.slices, self._offsets, self.plane
        hq, d = self.cfg.num_attention_heads, self.cfg.head_dim
        qkv = torch.cat(
            [torch.cat([q[offs[i] : offs[i + 1]], k[offs[i] : offs[i + 1]], v[offs[i] : offs[i + 1]]], dim=1)
             for i in self._pooled_idx]
        )  # (T, Hq + 2 Hkv, D)
        sent = self._guard(lambda: plane.broadcast(qkv, wait=False))  # the base's blocks overlap it
        recvs = []
        for rank in range(1, plane.world_size):
            rows = rows_of(self._items, rank)
            if rows:
                buf = torch.empty(rows, hq, d, dtype=q.dtype, device=q.device)
                recvs.append((rank, buf, self._guard(lambda r=rank, b=buf: plane.irecv(b, r, TAG_OUT))))
        with self.timer.phase("attention"):
            for i, it in zip(self._pooled_idx, self._items):
                lo = offs[i]
                for s, e in it.ranges_of(0):
                    o, _lse = prefill_block(self.kernel, q[lo + s : lo + e], k[lo : lo + e], v[lo : lo + e])
                    out[lo + s : lo + e] = o
            self.cache.write(layer, self._base_slots, k[self._base_tok], v[self._base_tok])

        def finish() -> None:
            with self.timer.phase("pool_wait"):
                sent.wait()
                for _rank, _buf, work in recvs:
                    work.wait()
            for rank, buf, work in recvs:
                row = 0
                for i, it in zip(self._pooled_idx, self._items):
                    for s, e in it.ranges_of(rank):
                        out[offs[i] + s : offs[i] + e] = buf[row : row + e - s]
                        row += e - s

        return finish

    def _decode_layer(self, layer: int, q, k, v, out: torch.Tensor):
        plane, idx = self.plane, self._pool_rows  # one token per sequence at decode
        qp = q[idx]  # (M, Hq, D), contiguous
        # The base's own part does not wait for the broadcast to leave: it overlaps the transfer.
        sent = self._guard(lambda: plane.broadcast(qp, wait=False))
        layout, mine, parts = self._layout, self._mine, self._parts
        with self.timer.phase("attention"):
            base_o, base_lse = self.local.attend_rows(layer, self._pool_plan, qp, k[idx], v[idx])
            o_view, lse_view = layout.views(mine)
            o_view[0].copy_(base_o)
            lse_view[0].copy_(base_lse)

        def finish() -> None:
            with self.timer.phase("pool_wait"):
                plane.gather(parts, mine)
                sent.wait()
            with self.timer.phase("merge"):
                out[idx] = merge_stacked(*layout.views(parts))[0]

        return finish

    def end_step(self) -> None:
        assert self._batch is not None
        for i, s in enumerate(self._batch.slices):
            slab = self.cache.get(s.seq_id)
            if s.seq_id not in self.pooled:
                slab.length = s.end
            elif self._batch.kind == "prefill":
                slab.length = rows_of([self._items[self._pooled_idx.index(i)]], 0)
            else:
                slab.length += 1
        self._batch = None

    def _guard(self, fn):
        try:
            return fn()
        except PoolFailure:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise PoolFailure(f"data plane failed: {e}") from e
