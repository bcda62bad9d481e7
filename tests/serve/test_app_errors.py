"""The app's error paths in-process (no cluster): failures a real server cannot be made to have on
demand are injected as routes that raise. Everything a client can see is JSON."""
import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app


@pytest.fixture(scope="module")
def client():
    app = create_app()

    @app.get("/test-boom")
    async def boom():
        raise RuntimeError("injected failure")

    @app.get("/test-stream-boom")
    async def stream_boom():
        from serve.sse import sse_response

        async def chunks():
            yield {"text": "a"}
            raise RuntimeError("injected mid-stream failure")

        return sse_response(chunks())

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def error_of(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unexpected_exception_is_a_json_500_with_a_request_id(client, caplog):
    with caplog.at_level("ERROR", logger="fapool.serve"):
        err = error_of(client.get("/test-boom"), 500)
    assert err["type"] == "server_error" and "request id" in err["message"]
    rid = err["message"].split("request id ")[1].split(")")[0]
    assert any(rid in rec.getMessage() for rec in caplog.records), "the 500 is not logged with its request id"
    assert any("injected failure" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)


def test_a_failing_stream_ends_with_an_error_event_and_done(client):
    r = client.get("/test-stream-boom")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0]) == {"text": "a"}
    assert json.loads(events[1])["error"]["type"] == "server_error"
    assert events[2] == "[DONE]"


def test_405_carries_allow(client):
    r = client.get("/generate")
    assert error_of(r, 405)
    assert r.headers["allow"] == "POST"
    assert "GET" in client.post("/health").headers["allow"]


def test_malformed_bodies_never_reach_the_service(client):
    # Refused at validation, before the (absent) cluster is needed: 400, never 500 or 503.
    bodies = [b'{"prompt": "a", "stop": [""]}', b'{"prompt": "a", "max_tokens": "16"}', b"{}", b"[]",
              b'{"prompt": "a\\ud800"}', b'{"\\ud800": 1}', b"\xff\xfe", b'{"prompt": "a", "temperature": NaN}']
    for body in bodies:
        error_of(client.post("/generate", content=body, headers={"content-type": "application/json"}), 400)


def test_openapi_documents_400_and_the_one_of_prompt(client):
    spec = client.get("/openapi.json").json()
    assert "422" not in json.dumps(spec["paths"]) and "HTTPValidationError" not in json.dumps(spec)
    error_schema = spec["components"]["schemas"]["ErrorResponse"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method == "post":
                assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, path
    jsonschema.validate({"error": {"message": "m", "type": "t", "param": None, "code": None}}, error_schema)
    generate = spec["components"]["schemas"]["GenerateBody"]
    for bad in ({}, {"prompt": "a", "prompt_token_ids": [1]}, {"prompt": None}, {"prompt": "a", "stop": [""]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, generate)
    for good in ({"prompt": "a"}, {"prompt_token_ids": [1], "prompt": None}):
        jsonschema.validate(good, generate)
    assert "text/event-stream" in spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
