"""ASGI middleware at the door: the optional API key (every route but `/health`) and the body-size
limit. Pure ASGI, so streaming responses pass through untouched."""
from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from serve.errors import error_body

OPEN_PATHS = ("/health",)


class Guard:
    def __init__(self, app, settings) -> None:
        self.app = app
        self.settings = settings  # callable -> (api_key | None, max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api_key, max_body = self.settings()
        if api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope, api_key):
            return await _reply(send, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                "invalid_api_key")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return await _reply(send, 413, f"the body is {length} bytes; the limit is {max_body}", "body_too_large")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No length given (chunked): read up to the limit, then replay the body to the app.
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > max_body:
                    return await _reply(send, 413, f"the body exceeds the limit of {max_body} bytes",
                                        "body_too_large")
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _authorized(scope, api_key: str) -> bool:
        auth = _header(scope, b"authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if token is None and scope["path"] == "/dashboard" and scope["method"] == "GET":
            # A browser cannot set headers on navigation: the page takes ?api_key= and sends the header.
            token = parse_qs(scope.get("query_string", b"").decode()).get("api_key", [None])[0]
        return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _reply(send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
