"""The Guard's body limit, driven as ASGI: a body over the limit gets its 413 at once, whether the
server saw it in one message or in many (Serve's proxy may coalesce a chunked body)."""
import asyncio
import json

from serve.guard import Guard

SCOPE = {"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""}


async def never_called(scope, receive, send):
    raise AssertionError("the app must not see a refused body")


def refuse(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """Run the Guard (limit 10 bytes) on `messages`; returns what it sent and what it left unread."""
    left, sent = list(messages), []

    async def receive():
        if left:
            return left.pop(0)
        await asyncio.sleep(3600)  # a client with nothing more to send

    async def send(msg):
        sent.append(msg)

    asyncio.run(asyncio.wait_for(Guard(never_called, lambda: (None, 10))(dict(SCOPE), receive, send), 2))
    return sent, left


def body(data: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_whole_oversized_body_in_one_message_is_refused_without_waiting():
    sent, _ = refuse([body(b"x" * 20, False)])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


def test_the_rest_of_a_chunked_oversized_body_is_drained_before_the_413():
    sent, left = refuse([body(b"x" * 6, True), body(b"x" * 6, True), body(b"x" * 6, True), body(b"x", False)])
    assert sent[0]["status"] == 413 and left == []  # every chunk read: no reset hides the reply
