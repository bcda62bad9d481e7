"""What vLLM users script against besides completions: `/tokenize`, `/detokenize`, `/version`."""
from __future__ import annotations

import asyncio
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, model_validator

from serve.cli import version as package_version
from serve.errors import APIError
from serve.fields import TokenId, Text
from serve.routes.openai import check_model
from serve.schemas import ChatMessage
from serve.service import current

router = APIRouter()


class TokenizeBody(BaseModel):
    """A prompt, or chat messages rendered with the model's chat template (give exactly one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: StrictStr | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one(self) -> "TokenizeBody":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[TokenId]


@router.post("/tokenize")
async def tokenize(body: TokenizeBody):
    svc = current()
    check_model(svc, body.model)
    tok = svc.tokenizer
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await asyncio.to_thread(tok.encode, body.prompt, special)
    else:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                       add_generation_prompt=body.add_generation_prompt)
        ids = await asyncio.to_thread(tok.encode, text, bool(body.add_special_tokens))
    return {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids, "token_strs": None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody):
    svc = current()
    check_model(svc, body.model)
    vocab = svc.tokenizer.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens contains {bad}; token ids of this tokenizer are in [0, {vocab})",
                       "invalid_value", "tokens")
    return {"prompt": await asyncio.to_thread(svc.tokenizer.decode, body.tokens)}


@router.get("/version")
async def version():
    return {"version": package_version()}
