"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter

from actors.messages import TokenEvent
from serve.errors import APIError
from serve.routes_generate import sse_response
from serve.schemas import ChatBody, CompletionBody, OpenAIFields
from serve.service import current

router = APIRouter(prefix="/v1")


def _check_model(svc, body: OpenAIFields) -> str:
    if body.model not in (None, svc.model_name):
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {svc.model_name!r}",
                       "model_not_found", "model")
    return svc.model_name


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@router.get("/models")
async def models():
    svc = current()
    return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": 0,
                                        "owned_by": "fapool", "max_model_len": svc.max_model_len}]}


@router.post("/completions")
async def completions(body: CompletionBody):
    svc = current()
    model = _check_model(svc, body)
    text, ids = (body.prompt, None) if isinstance(body.prompt, str) else (None, body.prompt)
    cid, created, params = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.sampling_params()

    def chunk(text: str, finish: str | None, usage: dict | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            out["usage"] = usage
        return out

    if not body.stream:
        r = await svc.complete(text, ids, params)
        return chunk(r.text, r.finish_reason, _usage(r.prompt_tokens, r.completion_tokens))
    events = await svc.open_stream(text, ids, params)
    return sse_response(events, lambda ev: chunk(
        ev.text, ev.finish_reason, _usage(ev.prompt_tokens, ev.completion_tokens) if ev.finish_reason else None))


@router.post("/chat/completions")
async def chat_completions(body: ChatBody):
    svc = current()
    model = _check_model(svc, body)
    ids = svc.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    cid, created, params = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.sampling_params()
    if not body.stream:
        r = await svc.complete(None, ids, params)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": _usage(r.prompt_tokens, r.completion_tokens)}
    events = await svc.open_stream(None, ids, params)

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def render(ev: TokenEvent) -> dict:
        out = chunk({"content": ev.text} if ev.text else {}, ev.finish_reason)
        if ev.finish_reason:
            out["usage"] = _usage(ev.prompt_tokens, ev.completion_tokens)
        return out

    return sse_response(events, render, first=chunk({"role": "assistant", "content": ""}, None))
