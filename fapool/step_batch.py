"""The shape of one engine step: which sequences run and where their tokens sit in the flat batch,
and the scheduler's whole decision for it (`ScheduledStep`), the one value the model runner takes."""
from __future__ import annotations

from dataclasses import dataclass

from fapool.sequence import Sequence


@dataclass(frozen=True)
class SeqSlice:
    """`num_tokens` new tokens of sequence `seq_id`, at positions [start, start + num_tokens)."""

    seq_id: str
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class StepBatch:
    """Sequences of one step, their tokens concatenated in this order."""

    kind: str  # "prefill" or "decode"
    slices: tuple[SeqSlice, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.slices)

    def offsets(self) -> list[int]:
        """Start of each slice in the flat token batch, plus the total at the end."""
        out = [0]
        for s in self.slices:
            out.append(out[-1] + s.num_tokens)
        return out

    def last_token_indices(self) -> list[int]:
        return [o - 1 for o in self.offsets()[1:]]


@dataclass(frozen=True)
class ScheduledStep:
    """What the scheduler hands the model runner for one step (as vLLM's `SchedulerOutput`): the
    batch, its sequences in batch order (their tokens and sampling parameters), and how many of its
    rows decode (one new token after the prompt); the rest are prompt rows."""

    batch: StepBatch
    seqs: tuple[Sequence, ...]
    num_prompt_tokens: int
    num_decode_tokens: int
