"""Limits at the HTTP door, below the app: what the ASGI app cannot see, because uvicorn holds the
connection until a request's headers are complete.

Ray Serve runs uvicorn (its h11 protocol: httptools is not installed) in its proxy and, with
direct ingress, in the ingress replica, and exposes none of these settings but the keep-alive
(`http_options.keep_alive_timeout_s`). Its one hook into those processes is
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, a function each calls before it starts its server:
`install` is that function. It makes Serve's uvicorn use `LimitedH11`, which

- refuses a request line plus headers over `max_header_bytes` with 431 (h11 stops buffering there);
- gives a request's headers `header_timeout_s` to complete, from the connection's start or the
  previous response's end: past it a 408, or a plain close if nothing came;
- closes idle keep-alive connections after `keep_alive_s`;
- answers 503 and closes past `max_connections` open connections;
- answers every parser error (a bad request line, Content-Length with Transfer-Encoding, a
  negative Content-Length, TLS bytes on the plain port) in the API's JSON error shape;
- and `JsonErrors` gives Serve's own plain-text errors (503, 500) that shape too.

The values are ServeOptions fields (flags); `fapool serve` hands them to those processes in the
environment they inherit, next to the hook (`env`).
"""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

HOOK = "serve.http_limits:install"
# How the values reach Serve's processes, not a setting of its own (no FAPOOL_ prefix: the
# supervisor forwards those to every actor it starts).
ENV = "RAY_SERVE_FAPOOL_HTTP_LIMITS"


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 << 10
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 2048


def env(limits: HttpLimits) -> dict[str, str]:
    """What to set before Ray starts so that Serve's HTTP servers apply `limits`."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": HOOK, ENV: json.dumps(asdict(limits))}


def install() -> list:
    """Serve's proxy callback: make this process's Serve HTTP server a LimitedH11 one, and return
    the one middleware it should wrap its ASGI app in (the callback's contract: a list of them)."""
    from ray.serve._private import http_util
    from starlette.middleware import Middleware

    limits = HttpLimits(**json.loads(os.environ.get(ENV) or "{}"))
    if not isinstance(http_util.uvicorn, _Uvicorn):
        http_util.uvicorn = _Uvicorn(http_util.uvicorn, limits)
    return [Middleware(JsonErrors)]


ERROR_CODES = {404: "not_found", 408: "timeout", 500: "internal_error", 503: "unavailable"}


class JsonErrors:
    """Serve's own error responses are plain text (a full queue's or a restarting replica's 503,
    a 500 from outside the app): the same status, in the API's error shape. JSON and success
    responses (streams included) pass untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        body = b""

        async def rewriting(msg: dict) -> None:
            nonlocal held, body
            if msg["type"] == "http.response.start":
                ctype = dict((k.lower(), v) for k, v in msg.get("headers", ())).get(b"content-type", b"")
                if msg["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held = msg
                    return
            elif held is not None and msg["type"] == "http.response.body":
                body += msg.get("body", b"")
                if msg.get("more_body", False):
                    return
                from serve.errors import error_body

                status = held["status"]
                text = body.decode(errors="replace").strip() or f"HTTP {status}"
                payload = json.dumps(error_body(status, text, ERROR_CODES.get(status, "server_error"))).encode()
                headers = [(k, v) for k, v in held.get("headers", ()) if k.lower() not in (b"content-type",
                                                                                           b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                await send({**held, "headers": headers})
                return await send({"type": "http.response.body", "body": payload})
            await send(msg)

        await self.app(scope, receive, rewriting)


class _Uvicorn:
    """`uvicorn` as Serve's http_util sees it: the same, but its Config carries the limits."""

    def __init__(self, uvicorn: Any, limits: HttpLimits) -> None:
        self._uvicorn, self._limits = uvicorn, limits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._uvicorn, name)

    def Config(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - uvicorn's name
        limits = self._limits
        protocol = type("LimitedH11", (LimitedH11,), {"limits": limits})
        kwargs.update(http=protocol, h11_max_incomplete_event_size=limits.max_header_bytes,
                      timeout_keep_alive=limits.keep_alive_s, limit_concurrency=None)
        return self._uvicorn.Config(*args, **kwargs)


def raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response with the API's error body, closing the connection."""
    from serve.errors import error_body

    body = json.dumps(error_body(status, message, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def _import_protocol() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


class LimitedH11(_import_protocol()):  # type: ignore[misc]
    limits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import h11

        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._parse_error: Exception | None = None
        next_event = self.conn.next_event

        def watched() -> Any:  # h11's event loop, seen from here: the end of headers, the parser's error
            try:
                event = next_event()
                if isinstance(event, h11.Request):
                    self._stop_header_timer()
                    self._check_request(event)
            except h11.RemoteProtocolError as e:
                self._parse_error = e
                raise
            return event

        self.conn.next_event = watched

    def _check_request(self, event: Any) -> None:
        """h11 bounds only an incomplete request's buffer: a request whose headers arrived whole is
        measured here. Content-Length beside Transfer-Encoding is refused (RFC 9112 6.1: a request
        smuggling vector), where h11 would let Transfer-Encoding win."""
        import h11

        size = len(event.method) + len(event.target) + 11 + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.limits.max_header_bytes:
            raise h11.RemoteProtocolError("headers too large", error_status_hint=431)
        names = {k.lower() for k, _ in event.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise h11.RemoteProtocolError("Content-Length together with Transfer-Encoding")

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = _overloaded(self.limits.max_connections)  # its first request gets a 503, then a close
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_header_timer()  # the next request's headers get the same time

    def send_400_response(self, msg: str) -> None:
        e = self._parse_error
        status = getattr(e, "error_status_hint", 400) if e is not None else 400
        if status == 431:
            out = raw_response(431, "Request Header Fields Too Large",
                               f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
                               "headers_too_large")
        else:
            out = raw_response(400, "Bad Request", f"invalid HTTP request: {e or msg}", "invalid_http")
        self.transport.write(out)
        self.transport.close()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        import h11

        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # nothing of a request came: no one to answer
            return
        self.transport.write(raw_response(
            408, "Request Timeout", f"the request's headers did not complete within {self.limits.header_timeout_s:g}s",
            "header_timeout"))
        self.transport.close()


def _overloaded(limit: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        from serve.errors import error_body

        body = json.dumps(error_body(503, f"the server has {limit} connections open, its limit; retry shortly",
                                     "too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app
