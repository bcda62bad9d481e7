"""CUDA graphs for steps the whole-step graph does not take: the non-attention work of every layer,
replayed. Decode steps (pooled ones, or with a kernel that does not read pages itself) and prompt
chunks beside decodes alike.

A decode step of a small batch is bound by launching kernels, not by the GPU: the paper's model
launches about 200 of them per step in eager mode. A prompt chunk's step has the same host work
whatever its tokens (compiled elementwise calls at ~100 us each, cuBLAS calls, the attention call):
on an H200, 5.6 ms a step against 7.6 ms of GPU work at 2,000 tokens, so at 1,000 tokens the host
set the pace; replayed, 3.1 ms (bench.engine's profile). Attention cannot be captured (every
sequence has its own KV length and query count, and pooled sequences talk to their members over
NCCL), so each step runs

    graph 0: embed, rotary, layer 0 up to q, k, v
    eager:   attention of layer 0 (local kernels, or the pool over NCCL)
    graph 1: the rest of layer 0, layer 1 up to q, k, v
    ...
    graph L: the rest of layer L-1, final norm

with the step's tokens padded to a bucket (decode batches to a power of two, prompt chunks to a
multiple of 256 tokens) so that a handful of graph sets serve every step. Padding rows carry
whatever the last step left there; no operation mixes rows, and their outputs are ignored. Every
set shares one set of buffers of the largest bucket: only one step runs at a time.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from fapool.model import LlamaForCausalLM

log = logging.getLogger(__name__)
# Decode batch sizes of the segment graphs; the whole-step graph (step_graph.STEP_BUCKETS) goes
# further, since it replays the whole step where these replay the segments between attention calls.
SEGMENT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TOKEN_STEP = 256  # prompt-chunk buckets: every 256 tokens up to the step's most
MAX_GRAPH_TOKENS = 4096  # larger steps are GPU-bound: launched eagerly, no graph memory for them


def buckets_for(max_tokens: int) -> tuple[int, ...]:
    """Decode batch sizes, then token counts every TOKEN_STEP up to `max_tokens` (capped)."""
    top = -(-min(max_tokens, MAX_GRAPH_TOKENS) // TOKEN_STEP) * TOKEN_STEP
    return tuple(sorted(set(SEGMENT_BUCKETS) | {128} | set(range(TOKEN_STEP, top + 1, TOKEN_STEP))))


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


class SegmentGraphs:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 max_tokens: int = SEGMENT_BUCKETS[-1]) -> None:
        """`max_tokens`: the most tokens a step carries (decodes plus prompt chunks)."""
        self.model, self.device, self.dtype = model, device, dtype
        self.enabled = device.type == "cuda"
        self.buckets = buckets_for(max_tokens)
        self._sets: dict[int, GraphSet] = {}
        self._buffers: GraphSet | None = None  # of the largest bucket; every set is a view of it
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.runs: Counter[int] = Counter()  # steps run, by bucket

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None) if self.enabled else None

    @torch.inference_mode()
    def capture_all(self, min_tokens: int = 1) -> None:
        """Capture every bucket of at least `min_tokens` now (the engine's warm-up)."""
        for b in self.buckets:
            if b >= min_tokens and b not in self._sets:
                self._capture(b)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """The forward of `input_ids` (N,) at `positions`: (N, hidden) after the final norm, a view
        valid until the next run."""
        n = input_ids.shape[0]
        size = self.bucket(n)
        assert size is not None, f"no graph bucket for a step of {n} tokens"
        gs = self._sets.get(size) or self._capture(size)
        self.runs[size] += 1
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
        if self._buffers is None:
            self._buffers = self._allocate(self.buckets[-1])
        full = self._buffers
        views = (getattr(full, f)[:n] for f in ("ids", "pos", "cos", "sin", "x", "q", "k", "v", "o", "hidden"))
        gs = GraphSet(*views, graphs=[])
        dev = self.device
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
        log.info("captured segment graphs for %d tokens (%d segments)", n, len(segments))
        return gs

    def _allocate(self, n: int) -> GraphSet:
        cfg = self.model.config
        dev, dt = self.device, self.dtype
        return GraphSet(
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
