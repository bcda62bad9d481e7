"""One line of a batch job: its schema (the body of `POST /generate`, plus `id`), how it becomes a
request, and how a request becomes its output record, retrying while the cluster is overloaded."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import StrictInt, StrictStr, ValidationError

from fapool.errors import ErrorType, RequestError
from fapool.sampling import SamplingParams
from serve.errors import APIError, validation_message
from serve.fields import Refused, Temperature
from serve.schemas import GenerateBody

RETRY_FIRST_S = 0.1  # the first wait after an "overloaded" refusal; it doubles up to RETRY_MAX_S
RETRY_MAX_S = 2.0


class BatchLine(GenerateBody):
    """The fields and checks of `POST /generate`, with one intended difference: `temperature`
    defaults to 0 (greedy), so that an offline run is reproducible unless a line asks otherwise."""

    id: Union[StrictStr, StrictInt, None] = None  # echoed in the output; `line` is always there too
    temperature: Temperature = 0.0
    stream: Annotated[Any, Refused(False, fix="remove it: the job writes whole results")] = None
    logprobs: Annotated[Any, Refused(fix="use the HTTP server (/generate) for logprobs")] = None
    prompt_logprobs: Annotated[Any, Refused(fix="use the HTTP server (/generate) for logprobs")] = None


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based line number in the input: the key that matches an output to its input
    id: Any
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams


def error_record(line: int, rid: Any, message: str, kind: ErrorType) -> dict[str, Any]:
    return {"line": line, "id": rid, "error": {"message": f"line {line}: {message}", "type": kind.value}}


def parse_line(line: int, text: str) -> BatchRequest | dict[str, Any]:
    """A request, or the error record of a line that can never run."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return error_record(line, None, f"not valid JSON ({e})", ErrorType.INVALID_REQUEST)
    if not isinstance(obj, dict):
        return error_record(line, None, "a line must be a JSON object", ErrorType.INVALID_REQUEST)
    rid = obj.get("id") if type(obj.get("id")) in (str, int) else None  # echo only an id the schema allows
    try:
        body = BatchLine.model_validate(obj)
        params = body.sampling_params()
    except ValidationError as e:
        return error_record(line, rid, validation_message(list(e.errors()))[0], ErrorType.INVALID_REQUEST)
    except APIError as e:  # a value only the combination makes wrong (min_tokens > max_tokens)
        return error_record(line, rid, e.message, ErrorType.INVALID_REQUEST)
    return BatchRequest(line, body.id, body.prompt, body.prompt_token_ids, params)


def run_request(cluster: Any, req: BatchRequest, retry_s: float) -> tuple[dict[str, Any], int]:
    """The output record of `req`, and how many times it was retried. An "overloaded" refusal is
    retried with exponential backoff for up to `retry_s`; other errors become error records."""
    delay_s, deadline, retries = RETRY_FIRST_S, time.monotonic() + retry_s, 0
    while True:
        try:
            g = cluster.generate(req.prompt, req.params, prompt_token_ids=req.prompt_token_ids)
        except RequestError as e:
            if e.type.retryable and time.monotonic() + delay_s < deadline:
                time.sleep(delay_s)
                delay_s, retries = min(2 * delay_s, RETRY_MAX_S), retries + 1
                continue
            return error_record(req.line, req.id, str(e), e.type), retries
        except Exception as e:  # noqa: BLE001 - a failure of the cluster: record it, go on with the rest
            return error_record(req.line, req.id, f"{type(e).__name__}: {e}", ErrorType.INTERNAL), retries
        return {"line": req.line, "id": req.id, "text": g.text, "token_ids": list(g.token_ids),
                "finish_reason": g.finish_reason,
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}}, retries
