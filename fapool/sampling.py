"""Sampling parameters (validated at the boundary) and the per-sequence sampler."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from fapool.stops import StopMatcher

# Below this temperature a row is sampled greedily, as vLLM does (its _SAMPLING_EPS): dividing
# logits by 1e-300 overflows to inf and softmax then gives NaN.
GREEDY_TEMPERATURE = 1e-5
# Bounded work per request. OpenAI allows 4 stop strings; 64 of up to 1,024 characters leaves
# room for any real use while keeping the trie at most 64 Ki nodes.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI allows 300)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` (or below 1e-5) is greedy."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a single string is taken as one stop string
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each sampled token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt + output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until the output has this many tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (vLLM's)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text in it
    skip_special_tokens: bool = True  # leave special tokens (bos, eos, ...) out of the text

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}; use an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r}; use a value in [0, 100] (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}; use a value in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}; use 0 (off) or a positive integer")
        # The one place stop strings are normalised: every edge passes what the client sent.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check_stops(self.stop)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; send at most {MAX_STOP_TOKEN_IDS}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name}={k!r}; use an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)!r}; use a value in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}; use a value in (0, 100] (1 is off)")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; send at most {MAX_LOGIT_BIAS}")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r}; use a value in [0, 1] (0 is off)")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens!r}; use an integer in [0, max_tokens={self.max_tokens}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether a logit processor (fapool/logits.py) changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def needs_logits(self) -> bool:
        """Whether its tokens need the logits on the host side of a step (sampling, logprobs,
        processors): such a request keeps the engine off the async captured decode path."""
        return (not self.greedy or self.logprobs is not None or self.prompt_logprobs is not None
                or self.processes_logits)

    # Built where the tokens are made (the engine), on first use; never part of equality.
    @cached_property
    def stop_matcher(self) -> StopMatcher:
        return StopMatcher(self.stop)

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids)


def check_stops(stop: tuple[str, ...] | list[str]) -> None:
    """Raise `ValueError` naming the problem for stop strings over the caps or empty."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(stop)} strings; send at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s:
            raise ValueError(f"stop[{i}] is an empty string, which would end every request at once; remove it")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop[{i}] has {len(s)} characters; each stop string may have at most {MAX_STOP_CHARS}")


class SampleError(int):
    """The token `sample()` gives a row it could not sample (its logits hold no finite value):
    an int, so the list stays a list of token ids, that carries why. `OutputProcessor.append`
    finishes that request alone with finish_reason "error"; the rest of the batch goes on."""

    message: str

    def __new__(cls, message: str) -> "SampleError":
        self = super().__new__(cls, 0)
        self.message = message
        return self


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Pick one token per row of `logits` (M, vocab), each row with its own params and generator.

    Each request draws from its own generator so a seeded request gets the same tokens whatever
    else is in the batch. No row can fail another: a row whose distribution degenerates (inf or
    NaN after temperature, top-k and top-p) falls back to greedy over its finite logits, and a
    row with no finite logit at all gets a `SampleError` in its place.
    """
    tokens: list[int] = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy_rows) == len(params):  # the common case: no row gather, one sync
        return _greedy(logits)
    if greedy_rows:
        for i, t in zip(greedy_rows, _greedy(logits[greedy_rows])):
            tokens[i] = t
    other = [i for i, p in enumerate(params) if not p.greedy]
    if other:
        rows = logits[other].float().cpu()
        for j, i in enumerate(other):
            tokens[i] = _sample_row(rows[j], params[i], generators[i])
    return tokens


def _greedy(logits: torch.Tensor) -> list[int]:
    vals, idx = logits.max(dim=-1)
    # -1 flags a row whose max is NaN or -inf; still one transfer for the whole batch.
    picks = torch.where(vals > float("-inf"), idx, -1).tolist()
    for r, t in enumerate(picks):
        if t < 0:
            picks[r] = _argmax_or_error(logits[r])
    return picks


def _argmax_or_error(row: torch.Tensor) -> int:
    row = row.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if not bool((row > float("-inf")).any()):
        return SampleError("the model produced no usable logit for this request (all NaN or -inf); "
                           "this is a numerical fault of the model or its dtype, not of the request")
    return int(row.argmax())


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    probs = _probs(logits, p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        # Degenerate (NaN or inf in the logits, or an overflow of logits / temperature): the
        # limit of such a distribution is its argmax, so that is the row's token.
        return _argmax_or_error(logits)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs
