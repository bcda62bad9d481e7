"""A pool member's side of one base's data-plane group: holds KV shards, computes attention.

Runs in its own thread per (base, epoch) inside an `AttentionPoolActor`; shards live in the
member's `KVCache` under "base_id:handle", so they outlive the group that created them.
"""
from __future__ import annotations

import logging

import torch

from fapool.attention import AttentionKernel, prefill_block
from fapool.config import ModelConfig
from fapool.pool.kv_store import KVCache
from fapool.pool.protocol import OP_DECODE, OP_FREE, OP_PREFILL, OP_STOP, TAG_OUT, PartLayout, decode_prefill
from fapool.pool.transport import DataPlane
from fapool.profiling import PhaseTimer

log = logging.getLogger(__name__)


class ShardServer:
    def __init__(
        self, base_id: int, plane: DataPlane, cache: KVCache, kernel: AttentionKernel, cfg: ModelConfig,
        profile: bool = False,
    ) -> None:
        self.base_id = base_id
        self.plane = plane
        self.cache = cache
        self.kernel = kernel
        self.cfg = cfg
        self.steps = 0
        self.timer = PhaseTimer(cache.device, profile)
        self.phase_totals: dict[str, float] = {}
        self.handles: set[int] = set()  # shards this group created and has not freed

    @property
    def prefix(self) -> str:
        return f"{self.base_id}:"

    def key(self, handle: int) -> str:
        return f"{self.prefix}{handle}"

    def drop_own(self) -> None:
        """Free the shards this group created: it broke, so its base prefills them again.
        (Shards of earlier groups are freed by the base itself, through the next group.)"""
        for handle in self.handles:
            self.cache.free(self.key(handle))
        self.handles.clear()

    def serve(self) -> None:
        """Answer the base's ops until it retires the group (STOP) or the group breaks."""
        while True:
            op, body = self.plane.recv_header()
            if op == OP_STOP:
                return
            if op == OP_PREFILL:
                self._prefill(body)
                self.phase_totals["prefill_steps"] = self.phase_totals.get("prefill_steps", 0) + 1
            elif op == OP_DECODE:
                self._decode(body)
                self.phase_totals["decode_steps"] = self.phase_totals.get("decode_steps", 0) + 1
            elif op == OP_FREE:
                for handle in body:
                    self.cache.free(self.key(handle))
                    self.handles.discard(handle)
            else:
                raise RuntimeError(f"unknown data-plane op {op}")
            self.steps += 1
            if self.timer.enabled:
                for name, sec in self.timer.collect().items():
                    self.phase_totals[name] = self.phase_totals.get(name, 0.0) + sec

    def _prefill(self, body: list[int]) -> None:
        cfg, rank = self.cfg, self.plane.rank
        items = decode_prefill(body)
        total = sum(it.num_tokens for it in items)
        mine = [(it, it.ranges_of(rank)) for it in items]
        for it, ranges in mine:
            rows = sum(e - s for s, e in ranges)
            if rows:
                self.cache.free(self.key(it.handle))  # a recomputed sequence replaces its shard
                # Where the base placed it: in the base's share of this arena, which it alone manages.
                self.cache.place(self.key(it.handle), it.start_of(rank), rows, stale_prefix=self.prefix).length = rows
                self.handles.add(it.handle)
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = torch.empty(total, hq + 2 * hkv, cfg.head_dim, dtype=self.cache.dtype, device=self.cache.device)
        for layer in range(cfg.num_hidden_layers):
            self.plane.broadcast(qkv)  # (T, Hq + 2 Hkv, D)
            outs, start = [], 0
            for it, ranges in mine:
                q, k, v = qkv[start : start + it.num_tokens].split([hq, hkv, hkv], dim=1)
                start += it.num_tokens
                row = 0
                with self.timer.phase("prefill_attention"):
                    for s, e in ranges:
                        o, _lse = prefill_block(self.kernel, q[s:e], k[:e], v[:e])
                        outs.append(o)
                        self.cache.get(self.key(it.handle)).write(layer, row, k[s:e], v[s:e])
                        row += e - s
            if outs:
                self.plane.send(torch.cat(outs).contiguous(), 0, TAG_OUT)

    def _decode(self, body: list[int]) -> None:
        cfg = self.cfg
        handles = body
        m, hq, d = len(handles), cfg.num_attention_heads, cfg.head_dim
        q = torch.empty(m, hq, d, dtype=self.cache.dtype, device=self.cache.device)
        held = [(i, self.cache.get(self.key(h))) for i, h in enumerate(handles) if self.key(h) in self.cache]
        every = len(held) == m
        rows = torch.tensor([i for i, _ in held], dtype=torch.long, device=q.device)
        starts, lengths = [b.start for _, b in held], [b.length for _, b in held]
        kplan = self.kernel.varlen_plan(starts, lengths, cfg.num_key_value_heads, q.device) if held else None
        layout = PartLayout(m, hq, d, q.dtype)
        mine = layout.empty(1, q.device)
        o_view, lse_view = (t[0] for t in layout.views(mine))
        arena = self.cache.arena
        for layer in range(cfg.num_hidden_layers):
            self.plane.broadcast(q)  # (M, Hq, D)
            if not every:  # sequences this member holds no shard of contribute nothing: out 0, lse -inf
                o_view.zero_()
                lse_view.fill_(float("-inf"))
            if held:
                with self.timer.phase("decode_attention"):
                    o, lse = self.kernel.decode_varlen(q if every else q[rows], arena[layer, 0], arena[layer, 1],
                                                       starts, lengths, plan=kplan)
                    if every:
                        o_view.copy_(o)
                        lse_view.copy_(lse)
                    else:
                        o_view[rows] = o
                        lse_view[:, rows] = lse
            self.plane.gather(None, mine)  # to the base, which merges every rank's part
