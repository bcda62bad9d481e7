"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, never a 500 for a
client's mistake, and never a plain-text body (the Guard turns anything unexpected into a JSON 500
with a request id that the log carries too)."""
from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fapool.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}

# Set by the Guard for each request; read where an error is logged or reported.
REQUEST_ID: ContextVar[str] = ContextVar("fapool_request_id", default="-")


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


class ErrorJSON(JSONResponse):
    # ASCII escapes: a message may quote client text with a lone surrogate, which UTF-8 cannot encode.
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSON(error_body(status, message, code, param), status_code=status, headers=headers)


def internal_error(where: str, exc: BaseException) -> dict:
    """Log an unexpected failure with the request id and return the body the client gets."""
    rid = REQUEST_ID.get()
    log.error("request %s: unexpected error in %s", rid, where, exc_info=exc)
    return error_body(500, f"internal server error (request id {rid}); the server log has the details",
                      "internal_error")


def validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) for the first of pydantic's errors, in one sentence."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return f"the body is not valid JSON: {detail}", None, "invalid_json"
    # Drop "body" and the names pydantic gives union branches ("list[TextPart]"): not fields.
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x)]
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r}; remove it (/openapi.json lists the fields this server applies)"
        where = ".".join(loc[:-1]) or loc[-1]
        return (msg if where == loc[-1] else f"{where}: {msg}"), where, "unknown_field"
    if first.get("type") == "model_attributes_type" and not loc:
        msg = "the body must be a JSON object"
    if where and msg.startswith(loc[-1]):  # the message already names its field
        text = ".".join([*loc[:-1], msg])
    else:
        text = f"{where}: {msg}" if where else msg
    return text, where or None, "invalid_value"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(list(e.errors()))
        return error_response(400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # Keeps Starlette's headers: a 405 carries `Allow`.
        return error_response(e.status_code, str(e.detail), None, None, dict(e.headers or {}))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, e: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"the body is not valid JSON: {e}", "invalid_json")
