"""Request bodies at the HTTP edge (pydantic), turned into the core's `SamplingParams`."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fapool.sampling import SamplingParams


class SamplingFields(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    ignore_eos: bool = False
    stream: bool = False

    def sampling_params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=tuple(stop), ignore_eos=self.ignore_eos,
        )


class GenerateBody(SamplingFields):
    """`POST /generate`: our own simple route. Unknown fields are a mistake, so they are refused."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateBody":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        return self


class OpenAIFields(SamplingFields):
    """Fields OpenAI clients send; unknown ones are ignored as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> "OpenAIFields":
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported; use n=1")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported; leave logprobs unset")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        return self


class CompletionBody(OpenAIFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]

    @model_validator(mode="after")
    def _single_prompt(self) -> "CompletionBody":
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            self.prompt = p[0]
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _max(self) -> "ChatBody":
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self
