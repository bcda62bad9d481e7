"""ASGI middleware at the door: the optional API key (every route but `/health`), the body-size
limit, a body-read timeout, and the last word on errors. Pure ASGI, so streaming responses pass
through untouched.

- A body over the limit gets a 413 the client can read: the rest of the body is read and dropped
  first (up to DRAIN_CAP_BYTES), because closing a connection with unread data resets it, and the
  client then sees "connection reset" instead of the 413.
- A body that stops arriving for `--body-read-timeout-s` (default 10 s) gets a 408.
- Anything unexpected becomes an OpenAI-shaped JSON 500 with a request id, logged with the same id.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from urllib.parse import parse_qs

from serve.errors import REQUEST_ID, error_body, internal_error

OPEN_PATHS = ("/health",)
BODY_METHODS = ("POST", "PUT", "PATCH")
BODY_READ_TIMEOUT_S = 10.0  # ServeOptions.body_read_timeout_s, set by `set_body_read_timeout`
DRAIN_CAP_BYTES = 64 << 20  # past this, stop reading a refused body and close


def set_body_read_timeout(seconds: float) -> None:
    global BODY_READ_TIMEOUT_S
    BODY_READ_TIMEOUT_S = seconds


class Guard:
    def __init__(self, app, settings) -> None:
        self.app = app
        self.settings = settings  # callable -> (api_key | None, max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        REQUEST_ID.set(_request_id())
        started = False

        async def tracked(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self._guarded(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - the one place that turns any failure into JSON
            body = internal_error(f"{scope['method']} {scope['path']}", e)
            if started:
                raise  # the status line is gone: all that is left is to cut the connection
            await _reply(tracked, 500, body)

    async def _guarded(self, scope, receive, send):
        api_key, max_body = self.settings()
        refusal = None
        if api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope, api_key):
            refusal = 401, error_body(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                      "invalid_api_key")
        if scope["method"] not in BODY_METHODS:
            if refusal:
                return await _reply(send, *refusal)
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if refusal is None and length is not None and length.isdigit() and int(length) > max_body:
            refusal = 413, error_body(413, f"the body is {length} bytes; the limit is {max_body}", "body_too_large")
        if refusal is not None:
            await _drain(receive)
            return await _reply(send, *refusal)
        try:
            body = await _read_body(receive, max_body)
        except _TooLarge as e:
            if e.more:  # a last message over the limit leaves nothing to drain: waiting would stall 10 s
                await _drain(receive)
            return await _reply(send, 413, error_body(413, f"the body exceeds the limit of {max_body} bytes",
                                                      "body_too_large"))
        except asyncio.TimeoutError:
            return await _reply(send, 408, error_body(
                408, f"the body stopped arriving for {BODY_READ_TIMEOUT_S:g}s; send the whole body promptly",
                "body_timeout"), close=True)
        except _Disconnected:
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    def _authorized(scope, api_key: str) -> bool:
        auth = _header(scope, b"authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if token is None and scope["path"] == "/dashboard" and scope["method"] == "GET":
            # A browser cannot set headers on navigation: the page takes ?api_key= and sends the header.
            token = parse_qs(scope.get("query_string", b"").decode()).get("api_key", [None])[0]
        return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


class _TooLarge(Exception):
    def __init__(self, more: bool) -> None:
        super().__init__()
        self.more = more  # whether the client has more of the body to send


class _Disconnected(Exception):
    pass


async def _read_body(receive, max_body: int) -> bytes:
    """The whole body, read with a timeout per message; raises past `max_body`."""
    chunks, size, more = [], 0, True
    while more:
        msg = await asyncio.wait_for(receive(), BODY_READ_TIMEOUT_S)
        if msg["type"] != "http.request":
            raise _Disconnected
        chunk = msg.get("body", b"")
        size += len(chunk)
        more = msg.get("more_body", False)
        if size > max_body:
            raise _TooLarge(more)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(receive) -> None:
    """Read and drop the rest of a refused body (bounded), so the reply is not lost to a reset."""
    drained, more = 0, True
    try:
        while more and drained <= DRAIN_CAP_BYTES:
            msg = await asyncio.wait_for(receive(), BODY_READ_TIMEOUT_S)
            if msg["type"] != "http.request":
                return
            drained += len(msg.get("body", b""))
            more = msg.get("more_body", False)
    except asyncio.TimeoutError:
        return


def _request_id() -> str:
    """Serve's id of this request (it returns it as the `x-request-id` header), else a new one."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - not under Serve (a bare ASGI test)
        rid = ""
    return rid or f"req-{uuid.uuid4().hex}"


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _reply(send, status: int, body: dict, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
