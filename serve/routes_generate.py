"""`POST /generate`: FA Pool's own simple route (JSON or server-sent events)."""
from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from actors.messages import TokenEvent
from serve.errors import APIError, error_body
from serve.schemas import GenerateBody
from serve.service import current

router = APIRouter()


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def sse_response(events: AsyncIterator[TokenEvent], render: Callable[[TokenEvent], dict],
                 first: dict | None = None) -> StreamingResponse:
    """Server-sent events, one per engine step, ending with `data: [DONE]`. An error after the
    stream has started (the status line is gone) arrives as an OpenAI-shaped error event."""

    async def stream() -> AsyncIterator[str]:
        if first is not None:
            yield sse(first)
        try:
            async for ev in events:
                yield sse(render(ev))
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.code))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/generate")
async def generate(body: GenerateBody):
    svc = current()
    params = body.sampling_params()
    if not body.stream:
        r = await svc.complete(body.prompt, body.prompt_token_ids, params)
        return {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}}
    events = await svc.open_stream(body.prompt, body.prompt_token_ids, params)

    def render(ev: TokenEvent) -> dict:
        item = {"text": ev.text, "token_ids": list(ev.token_ids), "finish_reason": ev.finish_reason}
        if ev.finish_reason is not None:
            item["usage"] = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens}
        return item

    return sse_response(events, render)
