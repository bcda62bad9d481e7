"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Without `max_tokens` a request generates until EOS or the context limit, as vLLM and OpenAI do.
Streams carry no empty chunks; usage comes only when `stream_options.include_usage` asks, in one
last chunk with `choices: []`.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter

from actors.messages import TokenEvent
from serve.errors import APIError
from serve.openapi import STREAMING
from serve.schemas import ChatBody, CompletionBody
from serve.service import current
from serve.sse import gather_or_cancel, merge, sse_response

router = APIRouter(prefix="/v1")


def check_model(svc, name: str | None, param: str = "model") -> str:
    if name not in (None, svc.model_name):
        raise APIError(404, f"model {name!r} does not exist; this server serves {svc.model_name!r}",
                       "model_not_found", param)
    return svc.model_name


def model_card(svc) -> dict:
    return {"id": svc.model_name, "object": "model", "created": 0, "owned_by": "fapool",
            "max_model_len": svc.max_model_len}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def room(svc, max_tokens: int | None, text: str | None, ids: list[int] | None):
    """(text, ids, max_tokens): without max_tokens, all the context the prompt leaves, which needs
    the prompt's tokens (made here, off the event loop, exactly as the base would make them)."""
    if max_tokens is not None:
        return text, ids, max_tokens
    if ids is None:
        ids, text = await asyncio.to_thread(svc.tokenizer.encode, text), None
    limit = await context_limit(svc)
    left = limit - len(ids)
    if left < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens, which fills the context of {limit} tokens; "
                       "shorten the prompt", "context_length_exceeded", "prompt")
    return text, ids, left


_limits: dict[int, int] = {}


async def context_limit(svc) -> int:
    """The longest sequence every base can hold: the model's context, or less where the KV cache
    is smaller (asked once per service; InferenceService keeps only max_model_len)."""
    known = getattr(svc, "max_seq_tokens", None)  # once the service keeps it, no question to ask
    if known:
        return min(svc.max_model_len, known)
    if id(svc) not in _limits:
        try:
            infos = await svc.controller.get_base_info.remote()
        except Exception:  # noqa: BLE001 - no answer now: the model's context, asked again next time;
            return svc.max_model_len  # the engine refuses (400) what its KV cache cannot hold
        _limits[id(svc)] = min([svc.max_model_len, *(i.get("max_seq_tokens", svc.max_model_len) for i in infos)])
    return _limits[id(svc)]


@router.get("/models")
async def models():
    return {"object": "list", "data": [model_card(current())]}


@router.get("/models/{model_id}")
async def model(model_id: str):
    svc = current()
    check_model(svc, model_id, "model_id")
    return model_card(svc)


@router.post("/completions", responses=STREAMING)
async def completions(body: CompletionBody):
    svc = current()
    model = check_model(svc, body.model)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    jobs = [await room(svc, body.max_tokens, *((p, None) if isinstance(p, str) else (None, p)))
            for p in body.prompts()]

    def chunk(choices: list[dict], use: dict | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if use is not None or body.include_usage:
            out["usage"] = use
        return out

    def choice(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    if not body.stream:
        done = await gather_or_cancel(*(svc.complete(t, ids, body.sampling_params(n)) for t, ids, n in jobs))
        return chunk([choice(i, r.text, r.finish_reason) for i, r in enumerate(done)],
                     usage(sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)))
    streams = await gather_or_cancel(*(svc.open_stream(t, ids, body.sampling_params(n)) for t, ids, n in jobs))

    async def chunks() -> AsyncIterator[dict]:
        totals = [0, 0]
        async for i, ev in merge(streams):
            if ev.text or ev.finish_reason:
                yield chunk([choice(i, ev.text, ev.finish_reason)])
            _count(totals, ev)
        if body.include_usage:
            yield chunk([], usage(*totals))

    return sse_response(chunks())


@router.post("/chat/completions", responses=STREAMING)
async def chat_completions(body: ChatBody):
    svc = current()
    model = check_model(svc, body.model)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    ids = await asyncio.to_thread(svc.encode_chat, messages)
    _, ids, max_tokens = await room(svc, body.requested_max_tokens, None, ids)
    cid, created, params = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.sampling_params(max_tokens)
    if not body.stream:
        r = await svc.complete(None, ids, params)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": usage(r.prompt_tokens, r.completion_tokens)}
    events = await svc.open_stream(None, ids, params)

    def chunk(choices: list[dict], use: dict | None = None) -> dict:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if use is not None or body.include_usage:
            out["usage"] = use
        return out

    def choice(delta: dict, finish: str | None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def chunks() -> AsyncIterator[dict]:
        totals = [0, 0]
        yield chunk([choice({"role": "assistant", "content": ""}, None)])
        async for ev in events:
            if ev.text or ev.finish_reason:  # the last chunk may carry only its finish_reason
                yield chunk([choice({"content": ev.text} if ev.text else {}, ev.finish_reason)])
            _count(totals, ev)
        if body.include_usage:
            yield chunk([], usage(*totals))

    return sse_response(chunks())


def _count(totals: list[int], ev: TokenEvent) -> None:
    if ev.finish_reason is not None:
        totals[0] += ev.prompt_tokens
        totals[1] += ev.completion_tokens
