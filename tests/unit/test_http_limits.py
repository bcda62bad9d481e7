"""serve/http_limits.py over real sockets: a real uvicorn server built the way Ray Serve builds its
own once the hook is installed (Serve's processes are covered by tests/serve/test_closed.py)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from serve.http_limits import HttpLimits, JsonErrors, _Uvicorn
from tests.helpers.raw_http import error_of, read_to_close

LIMITS = HttpLimits(max_header_bytes=8 << 10, header_timeout_s=1.0, keep_alive_s=1, max_connections=4)


async def plain(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/busy":  # what Serve's proxy sends when the replica's queue is full
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


app = JsonErrors(plain)  # as install() has Serve wrap its ASGI app


@pytest.fixture(scope="module")
def port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(_Uvicorn(uvicorn, LIMITS).Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def parsed(raw: bytes) -> tuple[int, dict]:
    status, err, head = error_of(raw)
    assert b"content-type: application/json" in head.lower(), head
    assert set(err) == {"message", "type", "param", "code"}
    return status, err


def test_a_normal_request_is_served_and_idle_keep_alive_closes(port):
    with connect(port) as c:
        c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        t0 = time.monotonic()
        raw = read_to_close(c)  # the response, then the server closes the idle connection
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"ok")
        assert time.monotonic() - t0 < 8  # keep-alive 1 s (+ header timer 1 s), far below the 10 s socket timeout


def test_headers_over_the_limit_get_431(port):
    for header in (b"x-big: " + b"a" * (9 << 10) + b"\r\n",  # arrives whole
                   b"".join(b"x-%d: %s\r\n" % (i, b"b" * 100) for i in range(100))):  # many headers
        with connect(port) as c:
            c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n" + header + b"\r\n")
            status, err = parsed(read_to_close(c))
            assert status == 431 and err["code"] == "headers_too_large"


def test_headers_streamed_past_the_limit_are_cut_off(port):
    with connect(port) as c:
        c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        try:
            while sent < 4 << 20:  # h11 stops buffering at the limit: the server never reads 4 MiB
                c.sendall(b"a" * 4096)
                sent += 4096
        except OSError:
            pass
        raw = b""
        try:
            raw = read_to_close(c)
        except OSError:  # reset: the server closed with our bytes unread
            pass
        assert sent < 4 << 20 or raw.startswith(b"HTTP/1.1 431"), (sent, raw[:100])
        if raw:
            assert parsed(raw)[0] == 431


def test_headers_must_complete_in_time(port):
    with connect(port) as c:
        c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        status, err = parsed(read_to_close(c))
        assert status == 408 and err["code"] == "header_timeout"
        assert time.monotonic() - t0 < 8
    with connect(port) as c:  # a connection that sends nothing is closed too
        assert read_to_close(c) == b""


@pytest.mark.parametrize("request_bytes, code", [
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n", "invalid_http"),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n", "invalid_http"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32, "invalid_http"),  # a TLS ClientHello
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "invalid_http"),
])
def test_parser_errors_are_openai_shaped(port, request_bytes, code):
    with connect(port) as c:
        c.sendall(request_bytes)
        status, err = parsed(read_to_close(c))
        assert status == 400 and err["code"] == code


def test_connections_past_the_limit_get_503(port):
    held = [connect(port) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.3)  # the server has accepted them
        with connect(port) as c:
            c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            status, err = parsed(read_to_close(c))
            assert status == 503 and err["code"] == "too_many_connections"
    finally:
        for c in held:
            c.close()
    time.sleep(0.3)
    with connect(port) as c:  # below the limit again
        c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert read_to_close(c).startswith(b"HTTP/1.1 200")


def test_serves_own_plain_text_errors_become_openai_shaped(port):
    with connect(port) as c:
        c.sendall(b"GET /busy HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        status, err = parsed(read_to_close(c))
        assert status == 503 and err["code"] == "unavailable" and "backpressure" in err["message"]
