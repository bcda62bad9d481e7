"""Field types of the request bodies: strict, bounded, with messages that name the value and the fix.

Shape checks run as `before` validators so a client gets one clear sentence (not a union's worth
of pydantic errors); the declared types are what `/openapi.json` shows, and they accept exactly
what the validators accept.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Union

from pydantic import (BeforeValidator, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, StrictInt, StrictStr,
                      ValidationInfo)
from pydantic_core import core_schema

from fapool.sampling import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, check_stops

MAX_BATCH_PROMPTS = 256  # prompts in one /v1/completions request (each is its own engine request)


def check_text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a string, not {_kind(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON lets "\ud800" through; no tokenizer can take it
        raise ValueError(f"{what} contains a lone UTF-16 surrogate ({v[e.start]!a}) at index {e.start}; "
                         "send valid Unicode text (escape pairs must form whole characters)") from None
    return v


def check_token_ids(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{what} must be a non-empty list of token ids (integers >= 0)")
    for i, t in enumerate(v):
        if type(t) is not int or t < 0:
            raise ValueError(f"{what}[{i}] is {_short(t)}; token ids are integers >= 0")
    return v


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- text ---------------------------------------------------------------------------------------
def _text_field(v: Any, info: ValidationInfo) -> Any:
    return v if v is None else check_text(v, info.field_name or "the value")


Text = Annotated[StrictStr, BeforeValidator(_text_field)]


# ---- stop ---------------------------------------------------------------------------------------
def _stop(v: Any) -> Any:
    if v is None:
        return v
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise ValueError(f"must be a string or a list of at most {MAX_STOP_STRINGS} strings, not {_kind(v)}")
    if len(items) > MAX_STOP_STRINGS:  # before touching the items: a huge list costs nothing more
        raise ValueError(f"has {len(items)} strings; send at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(items):
        check_text(s, f"stop[{i}]")
    check_stops(items)
    return v


_StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[Union[_StopString, Annotated[list[_StopString], Field(max_length=MAX_STOP_STRINGS)], None],
                 BeforeValidator(_stop)]

TokenId = Annotated[StrictInt, Field(ge=0)]

# ---- sampling values: declared once; each body picks its default (null: the core's default) ----
MaxTokens = Annotated[StrictInt, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0, strict=True, allow_inf_nan=False, description="0: greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, strict=True, allow_inf_nan=False)]
TopK = Annotated[StrictInt, Field(ge=-1, description="0 or -1: off")]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
StopTokenIds = Annotated[Union[list[TokenId], None], Field(max_length=MAX_STOP_TOKEN_IDS)]


def _prompt_ids(v: Any) -> Any:
    return v if v is None else check_token_ids(v, "prompt_token_ids")


PromptIds = Annotated[Union[Annotated[list[TokenId], Field(min_length=1)], None], BeforeValidator(_prompt_ids)]


# ---- logit_bias: {"token id": bias} ----------------------------------------------------------
def _logit_bias(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict):
        raise ValueError(f'must be an object of token id (a string) to bias, e.g. {{"50256": -100}}, not {_kind(v)}')
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"has {len(v)} entries; send at most {MAX_LOGIT_BIAS}")
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise ValueError(f"key {_short(k)} is not a token id; keys are token ids written as strings")
        if type(b) not in (int, float) or not -100 <= b <= 100:
            raise ValueError(f"[{k!r}] is {_short(b)}; a bias is a number in [-100, 100]")
    return v


LogitBias = Annotated[Union[dict[StrictStr, float], None], BeforeValidator(_logit_bias)]


def logit_bias_pairs(v: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    return tuple((int(k), float(b)) for k, b in (v or {}).items())


# ---- /v1/completions prompt: a string, token ids, or a batch of either -----------------------
def _prompt(v: Any) -> Any:
    if isinstance(v, str):
        return check_text(v, "prompt")
    if not isinstance(v, list) or not v:
        raise ValueError("must be a string, a list of token ids, or a non-empty list of strings or of "
                         f"token-id lists (a batch), not {_kind(v) if v != [] else 'an empty list'}")
    if type(v[0]) is int:
        return check_token_ids(v, "prompt")
    if len(v) > MAX_BATCH_PROMPTS:
        raise ValueError(f"has {len(v)} prompts; send at most {MAX_BATCH_PROMPTS} per request")
    if isinstance(v[0], str):
        for i, p in enumerate(v):
            check_text(p, f"prompt[{i}]")
    else:
        for i, p in enumerate(v):
            check_token_ids(p, f"prompt[{i}]")
    return v


_Batch = Field(min_length=1, max_length=MAX_BATCH_PROMPTS)
CompletionPrompt = Annotated[
    Union[StrictStr, Annotated[list[TokenId], Field(min_length=1)], Annotated[list[StrictStr], _Batch],
          Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], _Batch]],
    BeforeValidator(_prompt)]


# ---- fields that are part of the OpenAI API but that this server cannot apply ----------------
class Refused:
    """`Annotated[Any, Refused(neutral..., fix=...)]`: a field accepted only at a value that changes
    nothing (`neutral`, or null); any other value is a 400 that names the field, so nothing is
    silently ignored. The schema lists the same values."""

    def __init__(self, *neutral: Any, fix: str) -> None:
        self.neutral, self.fix = neutral, fix

    def _check(self, v: Any, info: ValidationInfo) -> Any:
        if v is None or any(_same(v, n) for n in self.neutral):
            return None
        raise ValueError(f"{info.field_name}={_short(v)} is not supported by this server; {self.fix}")

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_before_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> dict:
        return {"enum": [*self.neutral, None]}


def _same(v: Any, n: Any) -> bool:
    if isinstance(n, bool) or isinstance(v, bool):
        return type(v) is type(n) and v == n
    if isinstance(n, (int, float)):
        return isinstance(v, (int, float)) and v == n
    return type(v) is type(n) and v == n
