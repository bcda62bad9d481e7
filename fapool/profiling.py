"""Phase timers for the step breakdown (attention, waiting on the pool, merge, the rest).

On CUDA the phases are timed with events on the current stream, so timing adds no host
synchronisation inside the step; `collect()` synchronises once, after the step has synced anyway.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self._open: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._open.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect."""
        if self._open:
            torch.cuda.synchronize()
            for name, start, end in self._open:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._open.clear()
        out = dict(self.totals)
        self.totals.clear()
        return out
