"""Async scheduling: launch decode step N+1 before reading step N's tokens.

A captured decode step leaves every row's greedy token on the device (`PagedDecodeGraphs.prev`).
The next step can take its input tokens from there, so the host launches it at once and only
then reads the previous step's tokens (a copy to pinned memory queued behind that step), runs the
output processing (detokenisation, stop strings, stream events) and schedules: all of it while
the GPU computes. Tokens reach the caller one step late; they are the same tokens.

A sequence with a token in flight counts it in its length (`Sequence.pending`) so the scheduler
places the next step right; a sequence found finished when its token is read may already have
one more step in flight, whose token is dropped (its pages are freed after that step in stream
order, so the step's writes land before any later owner's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fapool.step_batch import StepBatch
from fapool.sequence import Sequence
from fapool.step_graph import PagedDecodeGraphs


@dataclass
class InFlight:
    seqs: list[Sequence]
    rows: dict[str, int]  # request id -> its row of the step (and of `prev` after it)
    host: torch.Tensor  # the step's tokens, copied to (pinned) host memory behind the step
    event: torch.cuda.Event | None

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class AsyncDecode:
    def __init__(self, graphs: PagedDecodeGraphs) -> None:
        self.graphs = graphs
        n, cuda = graphs.buckets[-1], graphs.device.type == "cuda"
        # Two host buffers: step N's tokens are read while step N + 1 copies into the other.
        self._host = [torch.zeros(n, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._flip = 0
        self.inflight: InFlight | None = None

    def launch(self, batch: StepBatch, seqs: list[Sequence]) -> InFlight | None:
        """Launch a greedy decode step whose input tokens may still be on the device. Returns the
        step launched before it, now to be read."""
        prev = self.inflight
        ids, src = [], []
        for seq, s in zip(seqs, batch.slices):
            row = prev.rows.get(seq.request_id) if prev is not None else None
            src.append(-1 if row is None else row)
            ids.append(seq.token_slice(s.start, s.end)[0] if row is None else 0)
        g = self.graphs
        g.run(ids, batch.slices, src)
        n = len(seqs)
        host = self._host[self._flip][:n]
        self._flip ^= 1
        host.copy_(g.prev[:n], non_blocking=True)
        event = None
        if g.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        for seq, s in zip(seqs, batch.slices):
            seq.num_cached = s.end
            seq.pending += 1
        self.inflight = InFlight(list(seqs), {q.request_id: i for i, q in enumerate(seqs)}, host, event)
        return prev

    def take(self) -> InFlight | None:
        flight, self.inflight = self.inflight, None
        return flight
