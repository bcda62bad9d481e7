"""The served `/openapi.json`, made to say what the server does: validation failures are 400s
with the OpenAI error body (FastAPI's default documents 422), every error status a route can
answer is listed, and `/metrics` is documented as the text it is."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

STREAMING: dict[int | str, dict[str, Any]] = {200: {
    "description": "JSON; with `stream: true`, server-sent events ending with `data: [DONE]`",
    # One server-sent event, as schemathesis and OpenAPI 3.2 read an event-stream schema.
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}}

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
WHY = {
    "400": "Bad request: malformed JSON, a bad or unsupported value (the message names it), or a prompt "
           "and max_tokens over the context",
    "401": "A valid API key is required (when the server has one)",
    "404": "No such model",
    "408": "The body stopped arriving",
    "413": "The body is over --max-body-bytes",
    "429": "Too many requests in flight; retry after Retry-After seconds",
    "500": "Internal error (the message carries a request id that the server log has)",
    "503": "The server is starting, or no base actor can serve",
    "504": "The request ran past --request-timeout-s",
}


def _error(code: str) -> dict[str, Any]:
    return {"description": WHY[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas["ErrorResponse"] = ERROR_SCHEMA
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                codes = ["401", "500", "503"]
                if method in ("post", "put", "patch"):
                    codes += ["400", "408", "413", "429", "504"]
                elif op.get("parameters"):  # a query or path value that fails validation
                    codes.append("400")
                if path.startswith("/v1/") and (method == "post" or "{" in path) or path.endswith("tokenize"):
                    codes.append("404")
                for code in codes:
                    responses.setdefault(code, _error(code))
        _example_model_id(schema)
        metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
        if metrics:
            metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _example_model_id(schema: dict[str, Any]) -> None:
    """The served model's id as the example of `/v1/models/{model_id}` (clients and fuzzers use it)."""
    from serve.errors import APIError
    from serve.service import current

    op = schema.get("paths", {}).get("/v1/models/{model_id}", {}).get("get")
    try:
        name = current().model_name
    except APIError:  # not serving yet
        return
    for param in (op or {}).get("parameters", ()):
        if param.get("name") == "model_id":
            param["example"] = name
