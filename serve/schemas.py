"""Request bodies at the HTTP edge (pydantic), turned into the core's `SamplingParams`.

Types are strict (`"16"` is not an integer; an integer is a float), unknown fields are refused,
and every OpenAI field is either applied or, at any value that would change the output, refused
with a 400 naming it (`Refused` in serve/fields.py).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from fapool.sampling import SamplingParams
from serve.fields import CompletionPrompt, PromptIds, Refused, Stop, StopTokenIds, Text, check_text


class GenerateBody(BaseModel):
    """`POST /generate`: FA Pool's own simple route. Give exactly one of prompt or prompt_token_ids."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["prompt_token_ids"], "properties": {"prompt_token_ids": {"type": "array"}}}]})
    prompt: Text | None = None
    prompt_token_ids: PromptIds = None
    max_tokens: StrictInt = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0, strict=True, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1: off")
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stop = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateBody":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        return self

    def sampling_params(self) -> SamplingParams:
        return make_params(self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stop,
                           self.stop_token_ids, self.ignore_eos)


def make_params(max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                seed: int | None, stop: str | list[str] | None, stop_token_ids: list[int] | None,
                ignore_eos: bool | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p), top_k=max(top_k or 0, 0), seed=seed,
        stop=tuple([stop] if isinstance(stop, str) else (stop or ())), stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=bool(ignore_eos))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


class OpenAIFields(BaseModel):
    """What the OpenAI completions and chat APIs share; null means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: up to the context limit")
    temperature: float | None = Field(None, ge=0.0, le=100.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stop = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # an end-user id for the caller's records; it changes no output
    # vLLM's extensions that this server applies.
    top_k: StrictInt | None = Field(None, ge=-1, description="0 or -1: off")
    stop_token_ids: StopTokenIds = None
    ignore_eos: StrictBool | None = None
    # OpenAI fields that need engine support this server does not have yet.
    n: Annotated[Any, Refused(1, fix="send one request per choice")] = None
    logprobs: Annotated[Any, Refused(False, fix="leave logprobs unset")] = None
    presence_penalty: Annotated[Any, Refused(0, fix="leave it unset or 0")] = None
    frequency_penalty: Annotated[Any, Refused(0, fix="leave it unset or 0")] = None
    logit_bias: Annotated[Any, Refused({}, fix="leave it unset")] = None
    min_tokens: Annotated[Any, Refused(0, fix="leave it unset or 0")] = None
    repetition_penalty: Annotated[Any, Refused(1, fix="leave it unset or 1")] = None

    @model_validator(mode="after")
    def _stream_options(self) -> "OpenAIFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return make_params(max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stop,
                           self.stop_token_ids, self.ignore_eos)


class CompletionBody(OpenAIFields):
    """`POST /v1/completions`. A list of strings or of token-id lists is a batch: one choice each."""

    prompt: CompletionPrompt
    echo: Annotated[Any, Refused(False, fix="leave echo unset or false")] = None
    best_of: Annotated[Any, Refused(1, fix="leave best_of unset or 1")] = None
    suffix: Annotated[Any, Refused("", fix="leave suffix unset")] = None

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
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    # Accepted as records only: they change no output.
    metadata: dict[StrictStr, StrictStr] | None = None
    store: Annotated[Any, Refused(False, fix="this server stores nothing; leave store unset or false")] = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None  # meaningless without tools, which are refused
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    # Chat features that need what this server does not have.
    top_logprobs: Annotated[Any, Refused(0, fix="leave top_logprobs unset")] = None
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
