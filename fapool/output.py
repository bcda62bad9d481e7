"""Turns sampled tokens into text and decides when a request stops."""
from __future__ import annotations

from fapool.logprobs import TokenLogprob
from fapool.sampling import SampleError
from fapool.sequence import Completion, RequestOutput, Sequence
from fapool.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids)

    def append(self, seq: Sequence, token: int, now_s: float, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Add one sampled token (and, when asked for, its logprob) to `seq`; report the new text
        and whether the request is done.

        A `SampleError` in place of a token (this row could not be sampled) finishes this request
        alone with finish_reason "error" and the sampler's message."""
        if isinstance(token, SampleError):
            return self.abort(seq, "error", token.message)
        seq.output_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if seq.first_token_s is None:
            seq.first_token_s = now_s
        p = seq.params
        if token in p.stop_token_set or (token in self.eos_ids and not p.ignore_eos):
            seq.finish_reason = "stop"
        if seq.stream is None:
            seq.stream = self.tokenizer.stream(p.skip_special_tokens)
        before = len(seq.text)
        seq.text += seq.stream.step(token)  # one token's work, not a decode of the whole output
        cut_at_stop = False
        # Only matches the new text completes; none before min_tokens, as vLLM.
        cut = p.stop_matcher.find(seq.text, before) if len(seq.output_ids) >= p.min_tokens else -1
        if cut >= 0:
            if p.include_stop_str_in_output:  # the longest stop string starting there matched
                cut += max(len(s) for s in p.stop if seq.text.startswith(s, cut))
            seq.text, seq.finish_reason, cut_at_stop = seq.text[:cut], "stop", True
        if seq.finish_reason is None and len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None and not cut_at_stop:
            # The stream holds back an unfinished character; one whole decode settles the end.
            full = self.tokenizer.decode(seq.output_ids, p.skip_special_tokens)
            if full.startswith(seq.text):
                seq.text = full
        return self._report(seq, (token,), logprobs=(logprob,) if logprob is not None else ())

    def abort(self, seq: Sequence, reason: str = "abort", error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        return self._report(seq, (), error)

    def _report(self, seq: Sequence, new_ids: tuple[int, ...], error: str | None = None,
                logprobs: tuple[TokenLogprob, ...] = ()) -> RequestOutput:
        finished = seq.finish_reason is not None
        visible = len(seq.text)
        if not finished:
            # Hold back an incomplete UTF-8 character and a possible start of a stop string.
            visible = len(seq.text.rstrip("\ufffd"))
            hold = max(seq.params.stop_matcher.max_len - 1, 0)
            visible = max(seq.sent_text_len, visible - hold)
        delta = seq.text[seq.sent_text_len : visible]
        seq.sent_text_len = visible
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            text_delta=delta,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            error=error,
            logprobs=logprobs,
            prompt_logprobs=self._prompt_logprobs(seq) if new_ids else None,
            queue_s=seq.scheduled_s - seq.arrival_s if finished and seq.scheduled_s is not None else None,
            cached_tokens=seq.cached_tokens,
        )

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's logprobs, once: with the first token reported."""
        if seq.params.prompt_logprobs is None or seq.prompt_lps_sent:
            return None
        seq.prompt_lps_sent = True
        return (None, *seq.prompt_lps)

    @staticmethod
    def completion(seq: Sequence) -> Completion:
        assert seq.finish_reason is not None, "completion() of an unfinished sequence"
        return Completion(
            request_id=seq.request_id,
            text=seq.text,
            token_ids=tuple(seq.output_ids),
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            logprobs=tuple(seq.output_logprobs),
            prompt_logprobs=(None, *seq.prompt_lps) if seq.params.prompt_logprobs is not None else None,
            cached_tokens=seq.cached_tokens,
        )
