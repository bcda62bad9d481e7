"""CUDA graphs for decode steps: the non-attention work of every layer, replayed.

A decode step of a small batch is bound by launching kernels, not by the GPU: the paper's model
launches about 200 of them per step in eager mode. Attention cannot be captured (every sequence
has its own KV length, and pooled sequences talk to their members over NCCL), so each step runs

    graph 0: embed, rotary, layer 0 up to q, k, v
    eager:   attention of layer 0 (local kernels, or the pool over NCCL)
    graph 1: the rest of layer 0, layer 1 up to q, k, v
    ...
    graph L: the rest of layer L-1, final norm

with batches padded to a few sizes so that a handful of graph sets serve every batch. Padding
rows carry token 0 at position 0; no operation mixes rows, and their outputs are ignored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from fapool.model import LlamaForCausalLM

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GraphSet:
    ids: torch.Tensor  # (N,) static inputs
    pos: torch.Tensor
    cos: torch.Tensor  # (N, 1, D) rotary tables, shared by every layer of the step
    sin: torch.Tensor
    x: torch.Tensor  # (N, hidden) residual stream
    q: torch.Tensor  # (N, Hq, D) attention inputs and output
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    hidden: torch.Tensor  # (N, hidden) after the final norm
    graphs: list[torch.cuda.CUDAGraph]


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.enabled = device.type == "cuda"
        self._sets: dict[int, GraphSet] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def bucket(self, n: int) -> int | None:
        return next((b for b in BUCKETS if b >= n), None) if self.enabled else None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """The decode forward of `input_ids` (N,) at `positions`: (N, hidden) after the final norm."""
        n = input_ids.shape[0]
        size = self.bucket(n)
        assert size is not None, f"no graph bucket for a batch of {n}"
        gs = self._sets.get(size) or self._capture(size)
        gs.ids[:n].copy_(input_ids)
        gs.pos[:n].copy_(positions)
        gs.graphs[0].replay()
        for layer in range(len(self.model.model.layers)):
            gs.o[:n].copy_(attend(layer, gs.q[:n], gs.k[:n], gs.v[:n]))  # padding rows: no attention
            gs.graphs[layer + 1].replay()
        return gs.hidden[:n]

    def _segments(self, gs: GraphSet) -> list[Callable[[], None]]:
        m = self.model.model
        layers = m.layers

        def write_qkv(layer_idx: int, delta: torch.Tensor | None) -> None:
            x, q, k, v = layers[layer_idx].pre_attention(gs.x, delta, gs.cos, gs.sin)
            gs.x.copy_(x)
            gs.q.copy_(q)
            gs.k.copy_(k)
            gs.v.copy_(v)

        def first() -> None:
            gs.x.copy_(m.embed_tokens(gs.ids))
            cos, sin = m.rotary.cos_sin(gs.pos, self.dtype)
            gs.cos.copy_(cos)
            gs.sin.copy_(sin)
            write_qkv(0, None)

        def middle(layer_idx: int) -> Callable[[], None]:
            def seg() -> None:
                x, delta = layers[layer_idx - 1].post_attention(gs.x, gs.o)
                gs.x.copy_(x)
                write_qkv(layer_idx, delta)  # the add of delta happens in this segment
            return seg

        def last() -> None:
            gs.hidden.copy_(m.final_norm(*layers[-1].post_attention(gs.x, gs.o)))

        return [first, *(middle(i) for i in range(1, len(layers))), last]

    def _capture(self, n: int) -> GraphSet:
        cfg = self.model.config
        dev, dt = self.device, self.dtype
        gs = GraphSet(
            ids=torch.zeros(n, dtype=torch.long, device=dev),
            pos=torch.zeros(n, dtype=torch.long, device=dev),
            cos=torch.zeros(n, 1, cfg.head_dim, dtype=dt, device=dev),
            sin=torch.zeros(n, 1, cfg.head_dim, dtype=dt, device=dev),
            x=torch.zeros(n, cfg.hidden_size, dtype=dt, device=dev),
            q=torch.zeros(n, cfg.num_attention_heads, cfg.head_dim, dtype=dt, device=dev),
            k=torch.zeros(n, cfg.num_key_value_heads, cfg.head_dim, dtype=dt, device=dev),
            v=torch.zeros(n, cfg.num_key_value_heads, cfg.head_dim, dtype=dt, device=dev),
            o=torch.zeros(n, cfg.num_attention_heads, cfg.head_dim, dtype=dt, device=dev),
            hidden=torch.zeros(n, cfg.hidden_size, dtype=dt, device=dev),
            graphs=[],
        )
        segments = self._segments(gs)
        # Warm up on a side stream (cuBLAS picks its algorithms and workspace), then capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                for seg in segments:
                    seg()
        torch.cuda.current_stream(dev).wait_stream(side)
        for seg in segments:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                seg()
            gs.graphs.append(g)
        self._sets[n] = gs
        log.info("captured decode graphs for batch %d (%d segments)", n, len(segments))
        return gs
