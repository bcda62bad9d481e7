"""HTTP over a raw socket, for the limits no HTTP client lets a test break (oversized or unfinished
headers, parser errors): read a response to the server's close, and split out its error."""
from __future__ import annotations

import json


def read_to_close(c) -> bytes:
    out = b""
    while chunk := c.recv(65536):
        out += chunk
    return out


def error_of(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, the OpenAI-shaped body's `error`, the head) of a raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"], head
