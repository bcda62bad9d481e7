"""A request's state inside the engine, and what the engine reports back after each step."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fapool.errors import ErrorType
from fapool.logprobs import TokenLogprob
from fapool.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Mutable engine-side state of one request. Only the engine thread touches it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival_s: float
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int = 0  # tokens whose K, V are stored
    cached_tokens: int = 0  # of its prompt, rows found in the prefix cache at its first admission
    text: str = ""  # decoded output, cut at a stop string
    sent_text_len: int = 0  # characters already reported
    finish_reason: str | None = None
    first_token_s: float | None = None
    scheduled_s: float | None = None  # monotonic time of its first admission to the running batch
    aside_since_s: float | None = None  # since when its executor holds it back (a pool grows for it)
    stream: object | None = None  # the tokenizer's TextStream of this output, made at the first token
    pending: int = 0  # tokens sampled on the device whose values the host has not read yet
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    # With params.prompt_logprobs: entry p is prompt token p + 1's; kept across a preemption.
    prompt_lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps_sent: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host has (not those still on the device)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_length(self) -> int:
        """Tokens this sequence may ever hold: what its KV reservation covers."""
        return len(self.prompt_ids) + self.params.max_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole of either."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]


@dataclass(frozen=True)
class RequestOutput:
    """One step's news about a request: new tokens and text, and whether it has finished. The one
    event type from the engine to a client: base actors stream these to the HTTP routes as they are."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of new_token_ids, with params.logprobs
    # With params.prompt_logprobs, once (with the first token): None for the first prompt token.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    queue_s: float | None = None  # once finished: seconds from arrival to first admission
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (usage's cached_tokens)
    error_type: ErrorType | None = None  # with `error`: fix, retry or report it (None: internal)

    @classmethod
    def failed(cls, request_id: str, error: str, error_type: ErrorType = ErrorType.INTERNAL) -> "RequestOutput":
        """The one event of a request that ends in an error (a refusal, or a fault around it)."""
        return cls(request_id, (), "", True, "error", 0, 0, error, error_type=error_type)


@dataclass(frozen=True)
class Completion:
    """A whole request's result, as `LLMEngine.generate` returns it."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    @classmethod
    def of(cls, outputs: list[RequestOutput]) -> "Completion":
        """The whole result of one request's stream of outputs, the last of which finished it."""
        last = outputs[-1]
        assert last.finish_reason is not None and last.finish_reason != "error", last
        prompt_lps = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
        return cls(last.request_id, "".join(o.text_delta for o in outputs),
                   tuple(t for o in outputs for t in o.new_token_ids), last.finish_reason, last.prompt_tokens,
                   last.completion_tokens, tuple(lp for o in outputs for lp in o.logprobs), prompt_lps,
                   last.cached_tokens)
