"""Request bodies at the HTTP edge (pydantic), turned into the core's `SamplingParams`.

Types are strict (`"16"` is not an integer; an integer is a float), unknown fields are refused,
and every OpenAI field is either applied or, at any value that would change the output, refused
with a 400 naming it (`Refused` in serve/fields.py).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from fapool.sampling import MAX_LOGPROBS, SamplingParams
from serve.errors import APIError
from serve.fields import (MAX_BATCH_PROMPTS, CompletionPrompt, LogitBias, MaxTokens, PromptIds, Refused, Seed, Stop,
                          StopTokenIds, Temperature, Text, TopK, TopP, check_text, logit_bias_pairs)

RESERVED_TEMPLATE_VARS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
MAX_N = 128  # choices (or best_of candidates) per prompt: each is an engine request
Logprobs = Annotated[Union[StrictInt, None], Field(ge=0, le=MAX_LOGPROBS)]


class ProcessorFields(BaseModel):
    """Logit processors (fapool/logits.py), shared by every route; null means off."""

    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, strict=True, allow_inf_nan=False,
                                             description="vLLM's: 1 is off")
    logit_bias: LogitBias = None
    min_tokens: StrictInt | None = Field(None, ge=0)
    # vLLM's: applied by the sampler and the detokenizer.
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True, allow_inf_nan=False,
                                description="drop tokens less likely than min_p x the most likely; 0 is off")
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = Field(None, description="default true")
    spaces_between_special_tokens: StrictBool | None = Field(
        None, description="accepted; as in vLLM's fast-tokenizer detokenizer, it changes nothing")

    def processor_kwargs(self) -> dict[str, Any]:
        return {"min_p": float(self.min_p or 0.0),
                "include_stop_str_in_output": bool(self.include_stop_str_in_output),
                "skip_special_tokens": self.skip_special_tokens is not False,
                "presence_penalty": float(self.presence_penalty or 0.0),
                "frequency_penalty": float(self.frequency_penalty or 0.0),
                "repetition_penalty": 1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
                "logit_bias": logit_bias_pairs(self.logit_bias), "min_tokens": self.min_tokens or 0}


class GenerateBody(ProcessorFields):
    """`POST /generate`: FA Pool's own simple route. Give exactly one of prompt or prompt_token_ids."""

    # Titled, so ReDoc and Swagger name the two shapes (not "GenerateBody | GenerateBody").
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"title": "Text prompt", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"title": "Token ids", "required": ["prompt_token_ids"],
         "properties": {"prompt_token_ids": {"type": "array", "items": {"type": "integer"}}}}]})
    prompt: Text | None = None
    prompt_token_ids: PromptIds = None
    max_tokens: MaxTokens = 64
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: Stop = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    logprobs: Logprobs = None  # each token's logprob and this many alternatives
    prompt_logprobs: Logprobs = None  # the same for the prompt's tokens

    def sampling_params(self) -> SamplingParams:
        return make_params(self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stop,
                           self.stop_token_ids, self.ignore_eos, logprobs=self.logprobs,
                           prompt_logprobs=self.prompt_logprobs, **self.processor_kwargs())

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateBody":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        return self


def make_params(max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                seed: int | None, stop: str | list[str] | None, stop_token_ids: list[int] | None,
                ignore_eos: bool | None, **extra: Any) -> SamplingParams:
    """The core's params; a value only the combination makes wrong (min_tokens over max_tokens) is
    a 400 naming its field."""
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p), top_k=max(top_k or 0, 0), seed=seed,
            stop=stop or (),
            stop_token_ids=tuple(stop_token_ids or ()), ignore_eos=bool(ignore_eos), **extra)
    except ValueError as e:
        m = re.match(r"(\w+)=", str(e))
        raise APIError(400, str(e), "invalid_value", m.group(1) if m else None) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


class OpenAIFields(ProcessorFields):
    """What the OpenAI completions and chat APIs share; null means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: MaxTokens | None = Field(None, description="default: up to the context limit")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # an end-user id for the caller's records; it changes no output
    # vLLM's extensions that this server applies.
    top_k: TopK | None = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: StrictBool | None = None
    n: StrictInt | None = Field(None, ge=1, le=MAX_N, description="choices per prompt")

    @model_validator(mode="after")
    def _stream_options(self) -> "OpenAIFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def logprob_kwargs(self) -> dict[str, int | None]:
        return {}

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return make_params(max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stop,
                           self.stop_token_ids, self.ignore_eos, **self.logprob_kwargs(), **self.processor_kwargs())


class CompletionBody(OpenAIFields):
    """`POST /v1/completions`. A list of strings or of token-id lists is a batch: one choice each."""

    prompt: CompletionPrompt
    # OpenAI's legacy completions and vLLM stop at 16 by default; null: up to the context limit;
    # 0 with echo: the prompt alone, with its logprobs (how lm-eval scores a continuation).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        16, description="default 16; null: up to the context limit; 0 (with echo): score the prompt only")
    logprobs: Logprobs = None  # each token's logprob and this many alternatives
    echo: StrictBool | None = None  # the prompt before the completion (with its logprobs, if asked)
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="candidates; the n most likely are returned")
    suffix: Annotated[Any, Refused("", fix="leave suffix unset")] = None

    def checked(self) -> "CompletionBody":
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing; use max_tokens >= 1, or echo: true to score "
                           "the prompt alone", "invalid_value", "max_tokens")
        if self.best_of is not None and self.best_of < self.num_choices:
            raise APIError(400, f"best_of={self.best_of} is less than n={self.num_choices}; use best_of >= n",
                           "invalid_value", "best_of")
        if self.best_of is not None and self.best_of > self.num_choices and self.stream:
            raise APIError(400, "best_of > n cannot stream (the best are known only at the end); "
                           "set stream to false or best_of to n", "invalid_value", "best_of")
        total = len(self.prompts()) * self.num_candidates
        if total > MAX_BATCH_PROMPTS:  # each is an engine request: bound one HTTP request's share
            name = "best_of" if self.num_candidates > self.num_choices else "n"
            raise APIError(400, f"{len(self.prompts())} prompts x {name}={self.num_candidates} = {total} requests; "
                           f"send at most {MAX_BATCH_PROMPTS} per call", "invalid_value", name)
        return self

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt and its logprobs, nothing generated (one token is
        run, as vLLM does, and dropped)."""
        return self.max_tokens == 0

    @property
    def num_candidates(self) -> int:
        return max(self.best_of or 1, self.num_choices)

    def logprob_kwargs(self) -> dict[str, int | None]:
        # Choosing the best of several needs each candidate's cumulative logprob.
        k = self.logprobs if self.logprobs is not None or self.num_candidates == self.num_choices else 0
        return {"logprobs": k, "prompt_logprobs": self.logprobs if self.echo else None}

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or type(p[0]) is int else list(p)


class TextPart(BaseModel):
    # Hints beside the text (e.g. cache_control) change no output: ignored, not refused.
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


def _content(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v if v is None else check_text(v, "content")
    if not isinstance(v, list):
        raise ValueError("must be a string or a list of content parts ({\"type\": \"text\", \"text\": ...})")
    for i, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise ValueError(f"content[{i}] has type {kind!r}; this model reads text parts only "
                             "({\"type\": \"text\", \"text\": \"...\"})")
        check_text(part.get("text"), f"content[{i}].text")
    return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[Text, list[TextPart], None] = None
    name: Text | None = None
    tool_calls: Annotated[Any, Refused([], fix="send text messages")] = None
    tool_call_id: Annotated[Any, Refused("", fix="send text messages")] = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        return _content(v)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    # Accepted as records only: they change no output.
    metadata: dict[StrictStr, StrictStr] | None = None
    store: Annotated[Any, Refused(False, fix="this server stores nothing; leave store unset or false")] = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None  # meaningless without tools, which are refused
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Logprobs = None  # alternatives per token, with logprobs: true
    # vLLM's chat template controls.
    add_generation_prompt: StrictBool = Field(True, description="end the prompt with the assistant's turn")
    continue_final_message: StrictBool = Field(False, description="continue the last (assistant) message "
                                                                  "instead of starting a new one")
    chat_template_kwargs: dict[StrictStr, Any] | None = Field(None, description="more variables for the "
                                                                                 "chat template")

    def checked(self) -> "ChatBody":
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:  # as vLLM: the two contradict
            raise APIError(400, "continue_final_message continues the last message, add_generation_prompt starts "
                           "a new one; set add_generation_prompt to false", "invalid_value", "continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                           "invalid_value", "continue_final_message")
        taken = sorted(set(self.chat_template_kwargs or ()) & RESERVED_TEMPLATE_VARS)
        if taken:
            raise APIError(400, f"chat_template_kwargs sets {taken[0]!r}, which the request itself sets; "
                           "use the request's field", "invalid_value", "chat_template_kwargs")
        return self

    def logprob_kwargs(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}
    # Chat features that need what this server does not have.
    tools: Annotated[Any, Refused([], fix="leave tools unset")] = None
    tool_choice: Annotated[Any, Refused("none", fix="leave tool_choice unset")] = None
    functions: Annotated[Any, Refused([], fix="leave functions unset")] = None
    function_call: Annotated[Any, Refused("none", fix="leave function_call unset")] = None
    response_format: Annotated[Any, Refused({"type": "text"}, fix="leave response_format unset")] = None
    audio: Annotated[Any, Refused(fix="this model reads and writes text only; leave audio unset")] = None
    modalities: Annotated[Any, Refused(["text"], fix='this model writes text only; leave it unset or ["text"]')] = None
    prediction: Annotated[Any, Refused(fix="leave prediction unset")] = None
    reasoning_effort: Annotated[Any, Refused(fix="leave reasoning_effort unset")] = None
    verbosity: Annotated[Any, Refused(fix="leave verbosity unset")] = None
    web_search_options: Annotated[Any, Refused(fix="leave web_search_options unset")] = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
