"""The OpenAI (and vLLM) shapes of logprobs, and the fan-out of `n` and `best_of`.

Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, `top_logprobs` a map
of token text to logprob holding the top alternatives and the chosen token (as vLLM);
`text[text_offset[i]:]` starts with `tokens[i]`. Chat:
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from fapool.logprobs import TokenLogprob
from fapool.sampling import SamplingParams
from fapool.sequence import Completion
from fapool.tokenizer import Tokenizer

MAX_SEED = 2**64 - 1


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of n requests of one prompt. With a seed, request i draws with seed + i: the
    choices differ from each other and the same request gives the same choices again."""
    if params.seed is None or n == 1:
        return [params] * n
    s = params.seed
    return [replace(params, seed=s + i if s + i <= MAX_SEED else s - i) for i in range(n)]


def best(results: list[Completion], n: int) -> list[Completion]:
    """`best_of`: the n candidates with the highest cumulative logprob, most likely first."""
    if len(results) == n:
        return results
    return sorted(results, key=lambda r: sum(lp.logprob for lp in r.logprobs), reverse=True)[:n]


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


class CompletionLogprobs:
    """One completions choice's logprobs, built up event by event (or all at once)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.offset = 0  # where the next token's text starts in the choice's text

    def shape(self, entries: Iterable[tuple[int, TokenLogprob | None]]) -> dict:
        """`entries`: (token id, its logprob or None: the first prompt token has none)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in entries:
            # As the choice's text renders it, so text_offset indexes that text: a special token
            # the text skips (the prompt's bos, an eos) is "" and takes no room.
            text = self.tok.decode([tid])
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top = {token_text(self.tok, t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)
            out["top_logprobs"].append(top)
        return out


def prompt_entries(prompt_ids: list[int], prompt_lps: tuple[TokenLogprob | None, ...] | None
                   ) -> list[tuple[int, TokenLogprob | None]]:
    lps = prompt_lps or (None,) * len(prompt_ids)
    return list(zip(prompt_ids, lps))


def output_entries(token_ids: Iterable[int], lps: Iterable[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return list(zip(token_ids, lps))


def chat_logprobs(tok: Tokenizer, lps: Iterable[TokenLogprob]) -> dict:
    def item(tid: int, v: float) -> dict:
        raw = tok.token_bytes(tid)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: its bytes, written as OpenAI writes them
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return {"token": text, "logprob": v, "bytes": list(raw)}

    return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for lp in lps]}


def generate_logprobs(lps: Iterable[TokenLogprob | None]) -> list[dict | None]:
    """`/generate`'s shape: token ids, no text."""
    return [None if lp is None else {"token_id": lp.token_id, "logprob": lp.logprob,
                                     "top_logprobs": [{"token_id": t, "logprob": v} for t, v in lp.top]}
            for lp in lps]
