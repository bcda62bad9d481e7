"""`StepFeed`: the controller's copy of the bases' step logs, and the cost model refit on them.

Every `REFIT_EVERY_S` the controller reads the steps each base timed since the last read
(`BaseActor.step_log(since_s=...)`), keeps the recent ones (`fapool.costfit.keep_recent`) and refits
(`fapool.costfit.fit_steps`); the SLO policy predicts with the result. It also keeps, per base, the
median measured decode step and what the fit predicts for those same steps: the dashboard's
"predicted vs measured".
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

from actors.messages import StepRecord
from fapool.costfit import StepFit, StepSample, fit_steps, keep_recent

log = logging.getLogger(__name__)
REFIT_EVERY_S = 5.0
READ_TIMEOUT_S = 2.0  # a base busy past this is read next time


def sample_of(r: StepRecord) -> StepSample:
    return StepSample(r.kind, r.num_seqs, r.num_tokens, r.read_tokens or float(r.context_tokens),
                      r.context_tokens, r.max_context, r.members, r.wall_s)


class StepFeed:
    def __init__(self) -> None:
        self.fit = StepFit()
        self.samples: tuple[StepSample, ...] = ()
        self.step_ms: tuple[tuple[int, float, float], ...] = ()  # (base, measured, predicted) medians
        self._since: dict[int, float] = {}  # base id -> wall clock of the last step read
        self._refit_s = 0.0

    def due(self, now_s: float) -> bool:
        return now_s - self._refit_s >= REFIT_EVERY_S

    async def refresh(self, bases: dict[int, Any], now_s: float) -> StepFit:
        """Read what is new from `bases` (base id -> handle) and refit."""
        self._refit_s = now_s
        ids = list(bases)
        logs = await asyncio.gather(
            *(asyncio.wait_for(bases[i].step_log.remote(since_s=self._since.get(i, time.time() - 60)),
                               READ_TIMEOUT_S) for i in ids), return_exceptions=True)
        new: list[StepSample] = []
        per_base: dict[int, list[StepSample]] = {}
        for i, recs in zip(ids, logs):
            if isinstance(recs, BaseException):
                log.debug("step log of base %d: %s", i, recs)
                continue
            if recs:
                self._since[i] = recs[-1].time_s
            per_base[i] = [sample_of(r) for r in recs if r.kind == "decode"]
            new += [sample_of(r) for r in recs]
        self.samples = keep_recent(self.samples, new)
        self.fit = fit_steps(self.samples, self.fit)
        self.step_ms = tuple((i, 1e3 * statistics.median(s.wall_s for s in xs),
                              1e3 * statistics.median(self.predict(s) for s in xs))
                             for i, xs in sorted(per_base.items()) if xs)
        return self.fit

    def predict(self, s: StepSample) -> float:
        """The fit's time for a decode step like `s` (its own read, not split again)."""
        return self.fit.decode_s(s.num_seqs, s.read_tokens, 0.0, 0) + self.fit.decode[3] * s.members

    def forget(self, base_id: int) -> None:
        self._since.pop(base_id, None)
