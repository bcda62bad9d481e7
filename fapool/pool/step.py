"""One step of the pooled executor: what `begin_step` decides once, and each layer's exchange.

`PooledStep` is frozen: it is made at `begin_step` from the batch and the pooled sequences, and
every layer of the step reads it. Its exchange buffers are reused by every layer (each layer's
gather has finished on the stream before the next layer writes them again).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from fapool.attention import AttentionKernel, prefill_block
from fapool.attention.merge import merge_stacked
from fapool.step_batch import StepBatch
from fapool.config import ModelConfig
from fapool.executor import LocalAttention, RowsPlan
from fapool.pool.membership import EpochSpec
from fapool.pool.protocol import TAG_OUT, PartLayout, PrefillItem, rows_of
from fapool.pool.transport import DataPlane, guard
from fapool.profiling import PhaseTimer

Finish = Callable[[], None]


@dataclass(frozen=True)
class PooledSeq:
    """A sequence whose KV is spread over the pool: part 0 on the base, parts 1.. on members."""

    handle: int
    member_ids: tuple[int, ...]  # holders of parts 1..
    starts: dict[int, int]  # member id -> first arena row of its shard there


@dataclass(frozen=True)
class DecodeBuffers:
    """A decode step's pooled rows and its exchange buffers."""

    rows: torch.Tensor  # (M,) the pooled sequences' token rows in the batch
    plan: RowsPlan  # the base's own part: its prefill rows plus every generated token
    layout: PartLayout
    mine: torch.Tensor  # the base's partial result, rank 0's part of the gather
    parts: torch.Tensor  # every rank's part


@dataclass(frozen=True)
class PrefillParts:
    """A prefill step's pooled prompts: how they split, and where the base's own rows go."""

    items: tuple[PrefillItem, ...]
    base_tok: torch.Tensor  # flat token rows of the base's blocks
    base_slots: torch.Tensor  # their slots in the base's paged cache


@dataclass(frozen=True)
class PooledStep:
    batch: StepBatch
    offsets: tuple[int, ...]
    pooled_idx: tuple[int, ...]  # batch positions of pooled sequences
    local_idx: tuple[int, ...]
    local_plan: RowsPlan | None
    local_rows: torch.Tensor  # flat token rows of the local sequences
    decode: DecodeBuffers | None = None
    prefill: PrefillParts | None = None


def plan_step(batch: StepBatch, pooled: dict[str, PooledSeq], spec: EpochSpec, local: LocalAttention,
              cfg: ModelConfig, plane: DataPlane | None) -> PooledStep:
    """The step's plan: which sequences are pooled, the local kernel plans, the exchange buffers."""
    cache, dev = local.cache, local.cache.device
    offs = batch.offsets()
    pooled_idx = tuple(i for i, s in enumerate(batch.slices) if s.seq_id in pooled)
    local_idx = tuple(i for i, s in enumerate(batch.slices) if s.seq_id not in pooled)
    mine = [batch.slices[i] for i in local_idx]
    local_plan = local.rows_plan([s.seq_id for s in mine], [s.start for s in mine],
                                 [s.end for s in mine]) if mine else None
    local_rows = torch.tensor([t for i in local_idx for t in range(offs[i], offs[i + 1])],
                              dtype=torch.long).to(dev, non_blocking=True)
    step = PooledStep(batch, tuple(offs), pooled_idx, local_idx, local_plan, local_rows)
    if not pooled_idx:
        return step
    assert plane is not None, "pooled sequences without a data plane"
    ids = [batch.slices[i].seq_id for i in pooled_idx]
    if batch.kind == "decode":
        lens = [cache.get(sid).length for sid in ids]
        layout = PartLayout(len(ids), cfg.num_attention_heads, cfg.head_dim, cache.dtype)
        bufs = DecodeBuffers(torch.tensor(pooled_idx, device=dev), local.rows_plan(ids, lens, [n + 1 for n in lens]),
                             layout, layout.empty(1, dev), layout.empty(plane.world_size, dev))
        return replace(step, decode=bufs)
    seqs = [pooled[sid] for sid in ids]
    items = tuple(PrefillItem(p.handle, batch.slices[i].num_tokens, (0, *map(spec.rank_of, p.member_ids)),
                              (0, *(p.starts[mid] for mid in p.member_ids))) for i, p in zip(pooled_idx, seqs))
    # Where the base's own rows of each pooled prompt go: its blocks, in order.
    toks = [offs[i] + t for i, it in zip(pooled_idx, items) for s, e in it.ranges_of(0) for t in range(s, e)]
    slots = [cache.slots(sid, 0, rows_of([it], 0)) for sid, it in zip(ids, items)]
    for i, sid in zip(pooled_idx, ids):  # and the full copy of its prompt's pages, for the prefix cache
        rows, shadow = cache.shadow_rows(sid)
        toks += (offs[i] + rows).tolist()
        slots.append(shadow)
    parts = PrefillParts(items, torch.tensor(toks, dtype=torch.long).to(dev),
                         torch.from_numpy(np.concatenate(slots)).to(dev))
    return replace(step, prefill=parts)


def prefill_layer(step: PooledStep, plane: DataPlane, kernel: AttentionKernel, local: LocalAttention,
                  timer: PhaseTimer, layer: int, q, k, v, out: torch.Tensor) -> Finish:
    """Send this layer's pooled prompts, compute the base's blocks; returns the finishing step."""
    assert step.prefill is not None
    offs, items = step.offsets, step.prefill.items
    qkv = torch.cat(
        [torch.cat([q[offs[i] : offs[i + 1]], k[offs[i] : offs[i + 1]], v[offs[i] : offs[i + 1]]], dim=1)
         for i in step.pooled_idx]
    )  # (T, Hq + 2 Hkv, D)
    sent = guard(lambda: plane.broadcast(qkv, wait=False))  # the base's blocks overlap it
    recvs = []
    for rank in range(1, plane.world_size):
        rows = rows_of(list(items), rank)
        if rows:
            buf = torch.empty(rows, *q.shape[1:], dtype=q.dtype, device=q.device)
            recvs.append((rank, buf, guard(lambda r=rank, b=buf: plane.irecv(b, r, TAG_OUT))))
    with timer.phase("attention"):
        for i, it in zip(step.pooled_idx, items):
            lo = offs[i]
            for s, e in it.ranges_of(0):
                o, _lse = prefill_block(kernel, q[lo + s : lo + e], k[lo : lo + e], v[lo : lo + e])
                out[lo + s : lo + e] = o
        tok = step.prefill.base_tok
        local.cache.write(layer, step.prefill.base_slots, k[tok], v[tok])

    def finish() -> None:
        with timer.phase("pool_wait"):
            sent.wait()
            for _rank, _buf, work in recvs:
                work.wait()
        for rank, buf, _work in recvs:
            row = 0
            for i, it in zip(step.pooled_idx, items):
                for s, e in it.ranges_of(rank):
                    out[offs[i] + s : offs[i] + e] = buf[row : row + e - s]
                    row += e - s

    return finish


def decode_layer(step: PooledStep, plane: DataPlane, local: LocalAttention, timer: PhaseTimer,
                 layer: int, q, k, v, out: torch.Tensor) -> Finish:
    """Send this layer's pooled queries, compute the base's part; returns the finishing merge."""
    bufs = step.decode
    assert bufs is not None
    idx = bufs.rows  # one token per sequence at decode
    qp = q[idx]  # (M, Hq, D), contiguous
    # The base's own part does not wait for the broadcast to leave: it overlaps the transfer.
    sent = guard(lambda: plane.broadcast(qp, wait=False))
    with timer.phase("attention"):
        base_o, base_lse = local.attend_rows(layer, bufs.plan, qp, k[idx], v[idx])
        o_view, lse_view = bufs.layout.views(bufs.mine)
        o_view[0].copy_(base_o)
        lse_view[0].copy_(base_lse)

    def finish() -> None:
        with timer.phase("pool_wait"):
            plane.gather(bufs.parts, bufs.mine)
            sent.wait()
        with timer.phase("merge"):
            out[idx] = merge_stacked(*bufs.layout.views(bufs.parts))[0]

    return finish
