"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`max_tokens` as vLLM: completions default to 16, chat to the context limit (null: the limit);
completions with `echo` and `max_tokens: 0` return the prompt with its logprobs only. A prompt with
`max_tokens` over the context is a 400 with code `context_length_exceeded`, as OpenAI's.
A stream sends a chunk for each engine event with tokens, when its tokens exist (as vLLM does): its
text may be empty while the engine holds back an unfinished character or a possible stop string.
No chunk carries neither a token nor a finish_reason. Usage comes only when
`stream_options.include_usage` asks, in one last chunk with `choices: []`.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import AsyncIterator

from fastapi import APIRouter

from fapool.sequence import RequestOutput
from serve.errors import APIError
from serve.openai_format import (CompletionLogprobs, best, chat_logprobs, choice_params, output_entries,
                                 prompt_entries)
from serve.openapi import STREAMING
from serve.schemas import ChatBody, CompletionBody
from serve.service import current
from serve.sse import gather_or_cancel, merge, sse_response

router = APIRouter(prefix="/v1")


def check_model(svc, name: str | None, param: str = "model") -> str:
    """`name` may be any of --served-model-name; responses carry the first, as vLLM's do."""
    names = getattr(svc, "model_names", (svc.model_name,))
    if name is not None and name not in names:
        raise APIError(404, f"model {name!r} does not exist; this server serves {' or '.join(map(repr, names))}",
                       "model_not_found", param)
    return svc.model_name


def model_card(svc, name: str) -> dict:
    # vocab_size beside vLLM's fields: what a client drawing random prompt ids (bench.serve) needs.
    return {"id": name, "object": "model", "created": 0, "owned_by": "fapool", "root": svc.model_name,
            "max_model_len": svc.max_model_len, "vocab_size": svc.tokenizer.vocab_size}


@dataclass(frozen=True)
class Envelope:
    """What a response body, or each chunk of a stream, carries around its choices. Usage comes
    where given, and as null on every chunk of a stream that asked for it in its last one."""

    id: str
    object: str  # "text_completion", "chat.completion", "chat.completion.chunk"
    created: int
    model: str
    include_usage: bool = False

    def wrap(self, choices: list[dict], use: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if use is not None or self.include_usage:
            out["usage"] = use
        return out


def choice(i: int, finish: str | None, logprobs: dict | None, **content) -> dict:
    """One choice; `content` is its `text`, `message` or `delta`."""
    return {"index": i, **content, "logprobs": logprobs, "finish_reason": finish}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose prefill the base's prefix cache skipped."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def room(svc, max_tokens: int | None, text: str | None, ids: list[int] | None) -> tuple[list[int], int]:
    """(ids, max_tokens): the prompt's tokens (made here, off the event loop, exactly as the base
    would make them) and what it may generate: without max_tokens, all the context it leaves.
    Over the context is a 400 `context_length_exceeded`, as OpenAI says it."""
    if ids is None:
        ids = await asyncio.to_thread(svc.tokenizer.encode, text)
    limit = await context_limit(svc)
    want = 1 if max_tokens is None else max(max_tokens, 1)  # 0 (echo alone) runs one token
    if len(ids) + want > limit:
        asked = f" + max_tokens {max_tokens}" if max_tokens else ""
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                       f"tokens{asked}; shorten the prompt or lower max_tokens", "context_length_exceeded",
                       "prompt" if len(ids) >= limit or not max_tokens else "max_tokens")
    return ids, limit - len(ids) if max_tokens is None else max_tokens


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
    svc = current()
    return {"object": "list", "data": [model_card(svc, n) for n in svc.model_names]}


@router.get("/models/{model_id}")
async def model(model_id: str):
    svc = current()
    check_model(svc, model_id, "model_id")
    return model_card(svc, model_id)


@router.post("/completions", responses=STREAMING)
async def completions(body: CompletionBody):
    svc = current()
    model = check_model(svc, body.checked().model)
    n = body.num_choices
    env = Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), model, body.include_usage)
    jobs = []
    for p in body.prompts():
        ids, max_tokens = await room(svc, body.max_tokens, p if isinstance(p, str) else None,
                                     None if isinstance(p, str) else p)
        echo = (p if isinstance(p, str) else svc.tokenizer.decode(ids)) if body.echo else ""
        jobs.append((None, ids, echo, body.sampling_params(max(max_tokens, 1))))
    only = body.prompt_only  # echo + max_tokens 0: the one token run is dropped

    if not body.stream:
        runs = await gather_or_cancel(*(svc.complete(t, ids, p) for t, ids, _, params in jobs
                                        for p in choice_params(params, body.num_candidates)))
        choices, totals, k = [], [0, 0, 0], body.num_candidates
        for j, (_, ids, echo, _) in enumerate(jobs):
            chosen = best(runs[j * k : (j + 1) * k], n)
            totals[0] += chosen[0].prompt_tokens
            totals[2] += chosen[0].cached_tokens
            totals[1] += sum(r.completion_tokens for r in chosen)
            for c, r in enumerate(chosen):
                lp = None
                if body.logprobs is not None:
                    entries = prompt_entries(ids, r.prompt_logprobs) if body.echo else []
                    out = [] if only else output_entries(r.token_ids, r.logprobs)
                    lp = CompletionLogprobs(svc.tokenizer).shape(entries + out)
                choices.append(choice(j * n + c, "length" if only else r.finish_reason, lp,
                                      text=echo + ("" if only else r.text)))
            if only:
                totals[1] -= sum(r.completion_tokens for r in chosen)
        return env.wrap(choices, usage(*totals))
    streams = await gather_or_cancel(*(svc.open_stream(t, ids, p) for t, ids, _, params in jobs
                                       for p in choice_params(params, n)))

    async def chunks() -> AsyncIterator[dict]:
        totals = [0, 0, 0]
        logprobs = [CompletionLogprobs(svc.tokenizer) for _ in streams]
        started = [False] * len(streams)
        async with aclosing(merge(streams)) as merged:  # closed with chunks(): its pumps stop
            async for i, ev in merged:
                _, ids, echo, _ = jobs[i // n]
                text, entries = ev.text_delta, output_entries(ev.new_token_ids, ev.logprobs)
                if only:
                    text, entries, ev = "", [], replace(ev, new_token_ids=(), logprobs=(), completion_tokens=0,
                                                        finish_reason=ev.finish_reason and "length")
                if not started[i] and (ev.new_token_ids or ev.finish_reason):
                    started[i] = True
                    text = echo + text
                    if body.echo:
                        entries = prompt_entries(ids, ev.prompt_logprobs) + entries
                lp = logprobs[i].shape(entries) if body.logprobs is not None and entries else None
                if ev.new_token_ids or text or ev.finish_reason or lp:
                    yield env.wrap([choice(i, ev.finish_reason, lp, text=text)])
                _count(totals, ev, i % n == 0)
        if body.include_usage:
            yield env.wrap([], usage(*totals))

    return sse_response(chunks(), streams)


@router.post("/chat/completions", responses=STREAMING)
async def chat_completions(body: ChatBody):
    svc = current()
    model = check_model(svc, body.checked().model)
    ids = await asyncio.to_thread(chat_prompt_ids, svc.tokenizer, body)
    ids, max_tokens = await room(svc, body.requested_max_tokens, None, ids)
    params = body.sampling_params(max_tokens)
    env = Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", int(time.time()), model)
    every = choice_params(params, body.num_choices)

    def logprobs(lps) -> dict | None:
        return chat_logprobs(svc.tokenizer, lps) if body.logprobs else None

    if not body.stream:
        runs = await gather_or_cancel(*(svc.complete(None, ids, p) for p in every))
        return env.wrap([choice(i, r.finish_reason, logprobs(r.logprobs),
                                message={"role": "assistant", "content": r.text}) for i, r in enumerate(runs)],
                        usage(runs[0].prompt_tokens, sum(r.completion_tokens for r in runs), runs[0].cached_tokens))
    streams = await gather_or_cancel(*(svc.open_stream(None, ids, p) for p in every))
    env = replace(env, object="chat.completion.chunk", include_usage=body.include_usage)

    async def chunks() -> AsyncIterator[dict]:
        totals = [0, 0, 0]
        for i in range(len(streams)):
            yield env.wrap([choice(i, None, None, delta={"role": "assistant", "content": ""})])
        async with aclosing(merge(streams)) as merged:  # closed with chunks(): its pumps stop
            async for i, ev in merged:
                lp = logprobs(ev.logprobs) if ev.logprobs else None
                if ev.new_token_ids or ev.text_delta or ev.finish_reason or lp:  # the last: maybe only a finish
                    delta = {"content": ev.text_delta} if ev.new_token_ids or ev.text_delta else {}
                    yield env.wrap([choice(i, ev.finish_reason, lp, delta=delta)])
                _count(totals, ev, i == 0)
        if body.include_usage:
            yield env.wrap([], usage(*totals))

    return sse_response(chunks(), streams)


def chat_prompt_ids(tok, body: ChatBody) -> list[int]:
    """The chat prompt's tokens, rendered as vLLM renders it: the template sees
    `add_generation_prompt` and `chat_template_kwargs`; with `continue_final_message` the text ends
    where the last (assistant) message's content ends, so the model continues it."""
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                   **(body.chat_template_kwargs or {}))
    if body.continue_final_message:
        final = messages[-1]["content"]
        at = text.rfind(final) if final else -1
        if final and at < 0:
            raise APIError(400, "the chat template does not render the final message's content as sent, so it "
                           "cannot be continued; set continue_final_message to false", "invalid_value",
                           "continue_final_message")
        text = text[: at + len(final)] if final else text
    return tok.encode(text, add_special_tokens=False)  # the template writes its own special tokens


def _count(totals: list[int], ev: RequestOutput, count_prompt: bool) -> None:
    """Usage: a prompt counts once however many choices it has."""
    if ev.finish_reason is not None:
        totals[0] += ev.prompt_tokens if count_prompt else 0
        totals[1] += ev.completion_tokens
        totals[2] += ev.cached_tokens if count_prompt else 0
