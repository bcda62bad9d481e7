"""`POST /generate`: FA Pool's own simple route (JSON or server-sent events)."""
from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Body

from serve.openai_format import generate_logprobs
from serve.openapi import STREAMING
from serve.schemas import GenerateBody
from serve.service import current
from serve.sse import sse_response

router = APIRouter()
# One example per shape: the docs' sample otherwise merges both (prompt and prompt_token_ids).
EXAMPLES = {
    "text": {"summary": "Text prompt", "value": {"prompt": "Hello", "max_tokens": 16, "temperature": 0}},
    "token_ids": {"summary": "Token ids", "value": {"prompt_token_ids": [72, 105], "max_tokens": 8,
                                                    "stream": True}},
}


@router.post("/generate", responses=STREAMING)
async def generate(body: Annotated[GenerateBody, Body(openapi_examples=EXAMPLES)]):
    svc = current()
    params = body.sampling_params()
    if not body.stream:
        r = await svc.complete(body.prompt, body.prompt_token_ids, params)
        out = {"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason,
               "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}}
        return _with_logprobs(out, body, r.logprobs, r.prompt_logprobs)
    events = await svc.open_stream(body.prompt, body.prompt_token_ids, params)

    async def chunks() -> AsyncIterator[dict]:
        async for ev in events:
            item = {"text": ev.text_delta, "token_ids": list(ev.new_token_ids), "finish_reason": ev.finish_reason}
            if ev.finish_reason is not None:
                item["usage"] = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens}
            yield _with_logprobs(item, body, ev.logprobs, ev.prompt_logprobs)

    return sse_response(chunks(), [events])


def _with_logprobs(item: dict, body: GenerateBody, lps, prompt_lps) -> dict:
    """`logprobs` (a list, one per token id) and `prompt_logprobs` (in the first event) when asked."""
    if body.logprobs is not None:
        item["logprobs"] = generate_logprobs(lps)
    if body.prompt_logprobs is not None and prompt_lps is not None:
        item["prompt_logprobs"] = generate_logprobs(prompt_lps)
    return item
