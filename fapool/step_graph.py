"""The whole decode step in one CUDA graph, attention included.

Where the attention kernel reads the paged cache itself with tensor-only metadata
(`AttentionKernel.paged_in_graph`, flash-attn-4), a local decode step is one graph replay:
embedding, every layer (its new K, V written to their slots, one paged attention launch), the
final norm and the LM head. The host only fills a few static buffers (token ids, positions, KV
slots, the page table and lengths) and replays, so the step runs at the GPU's pace.

One graph per batch-size bucket; padding rows read and write the scratch page 0 and are ignored.
The graph ends with the greedy token of every row in `prev`, and a row's input token can be taken
from `prev` instead of the host: the engine launches the next step before it reads this one's
tokens (async scheduling), so the host's work between steps overlaps the GPU's.
Small batches split each sequence's KV into chunks (`fapool.attention.paged.split_table`) so
the kernel has enough thread blocks to reach the memory bandwidth; the chunks merge by LSE
inside the graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fapool.attention import AttentionKernel
from fapool.attention.paged import merge_splits, split_table
from fapool.step_batch import SeqSlice
from fapool.model import LlamaForCausalLM
from fapool.model.ops import fused
from fapool.paged_cache import PagedKVCache

log = logging.getLogger(__name__)
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes of the whole-step graph


def splits_for(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """KV chunks per sequence: about two thread blocks per SM in all, at most 16 chunks."""
    return max(1, min(16, round(2 * num_sms / (batch * num_kv_heads))))


@dataclass
class StepBuffers:
    head: torch.Tensor  # (4 * n,) int64: ids | positions | slots | src, filled by one copy
    ids: torch.Tensor
    pos: torch.Tensor
    slots: torch.Tensor
    src: torch.Tensor  # row of `prev` holding a row's input token, or -1: take it from `ids`
    meta: torch.Tensor  # int32: page table (n * S, W) | rows (n * S,)
    table: torch.Tensor
    rows: torch.Tensor
    logits: torch.Tensor  # (n, vocab) float32, the graph's output
    splits: int
    graph: torch.cuda.CUDAGraph | None = None


class PagedDecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, kernel: AttentionKernel,
                 max_batch: int, capture: bool = True, fuse: bool = False) -> None:
        """`capture=False` runs the same step eagerly on the same buffers (tests on CPU). `fuse`
        compiles the LSE merge of KV splits into one kernel (as `EngineConfig.torch_compile`
        does the layers' elementwise chains)."""
        self.model, self.cache, self.kernel = model, cache, kernel
        self.merge = fused(merge_splits) if fuse else merge_splits
        self.device = cache.device
        self.capture = capture
        self.buckets = [b for b in STEP_BUCKETS if b < max_batch] + [next(b for b in STEP_BUCKETS if b >= max_batch)]
        on_cuda = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if on_cuda else 0
        self.prev = torch.zeros(self.buckets[-1], dtype=torch.long, device=self.device)
        self._sets: dict[int, StepBuffers] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def capture_all(self) -> None:
        for b in self.buckets:
            if b not in self._sets:
                self._capture(b)

    @torch.inference_mode()
    def run(self, token_ids: list[int], slices: tuple[SeqSlice, ...], src: list[int] | None = None) -> torch.Tensor:
        """Logits (n, vocab) of one decode step: `token_ids[i]` (or, where `src[i] >= 0`, the
        greedy token of row `src[i]` of the previous step, still on the device) at position
        `slices[i].start`. Afterwards `prev[:n]` holds this step's greedy tokens."""
        n = len(slices)
        size = self.bucket(n)
        assert size is not None, f"no graph bucket for a batch of {n}"
        buf = self._sets.get(size) or self._capture(size)
        c = self.cache
        ids = [s.seq_id for s in slices]
        pos = np.fromiter((s.start for s in slices), dtype=np.int64, count=n)
        table = c.page_table(ids, c.max_pages_per_seq)
        page = np.take_along_axis(table, (pos // c.page_size)[:, None], axis=1)[:, 0].astype(np.int64)
        head = np.zeros((4, size), dtype=np.int64)  # padding rows: token 0 at position 0, slot 0
        head[0, :n], head[1, :n], head[2, :n] = token_ids, pos, page * c.page_size + pos % c.page_size
        head[3] = -1
        if src is not None:
            head[3, :n] = src
        lens = np.ones(size, dtype=np.int64)  # padding rows see the scratch page's first row
        lens[:n] = pos + 1
        if buf.splits == 1:
            split, rows = table, lens[:n].astype(np.int32)
            if n < size:  # padding rows: all-zero pages (the scratch page), one row
                split = np.concatenate([split, np.zeros((size - n, split.shape[1]), dtype=np.int32)])
                rows = np.concatenate([rows, np.ones(size - n, dtype=np.int32)])
        else:
            full = np.zeros((size, table.shape[1]), dtype=np.int32)
            full[:n] = table
            split, rows = split_table(full, lens.tolist(), c.page_size, buf.splits, buf.table.shape[1])
        buf.head.copy_(torch.from_numpy(head.reshape(-1)), non_blocking=True)
        buf.meta.copy_(torch.from_numpy(np.concatenate([split.reshape(-1), rows])), non_blocking=True)
        if buf.graph is not None:
            buf.graph.replay()
        else:
            self._forward(buf)
        return buf.logits[:n]

    def _forward(self, buf: StepBuffers) -> None:
        m, c = self.model.model, self.cache
        ids = torch.where(buf.src >= 0, self.prev[buf.src.clamp(min=0)], buf.ids)
        x, delta = m.embed_tokens(ids), None
        cos, sin = m.rotary.cos_sin(buf.pos, x.dtype)
        for i, layer in enumerate(m.layers):
            x, q, k, v = layer.pre_attention(x, delta, cos, sin)
            c.write(i, buf.slots, k, v)
            k_pages, v_pages = c.pages_view(i)
            if buf.splits == 1:
                o, _ = self.kernel.paged_decode(q, k_pages, v_pages, buf.table, buf.rows)
            else:
                o, lse = self.kernel.paged_decode(q.repeat_interleave(buf.splits, 0), k_pages, v_pages,
                                                  buf.table, buf.rows)
                o, _ = self.merge(o, lse, buf.rows, buf.splits)
            x, delta = layer.post_attention(x, o)
        buf.logits.copy_(self.model.logits(m.final_norm(x, delta)))
        self.prev[: len(ids)].copy_(buf.logits.argmax(dim=-1))

    @torch.inference_mode()
    def _capture(self, n: int) -> StepBuffers:
        c, cfg = self.cache, self.model.config
        dev = self.device
        splits = splits_for(n, cfg.num_key_value_heads, self.num_sms) if self.num_sms else 1
        width = -(-c.max_pages_per_seq // splits)
        head = torch.zeros(4 * n, dtype=torch.long, device=dev)
        head[3 * n :] = -1
        meta = torch.zeros(n * splits * width + n * splits, dtype=torch.int32, device=dev)
        meta[n * splits * width :] = 1  # every chunk row sees the scratch row until filled
        buf = StepBuffers(head, head[:n], head[n : 2 * n], head[2 * n : 3 * n], head[3 * n :], meta,
                          meta[: n * splits * width].view(n * splits, width), meta[n * splits * width :],
                          torch.zeros(n, cfg.vocab_size, dtype=torch.float32, device=dev), splits)
        c.arena  # allocate before capture: the graph must not own the cache
        if not self.capture:
            self._sets[n] = buf
            return buf
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up: kernels compiled, cuBLAS workspaces chosen
            for _ in range(2):
                self._forward(buf)
        torch.cuda.current_stream(dev).wait_stream(side)
        buf.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(buf.graph, pool=self._pool):
            self._forward(buf)
        self._sets[n] = buf
        log.info("captured the decode step for batch %d (%d KV splits)", n, splits)
        return buf
