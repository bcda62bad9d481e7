"""A bounded schemathesis run against a live server's /openapi.json: zero 5xx, and every answer
matches the schema (documented status codes and content types, response bodies, `Allow` on 405,
schema-invalid bodies refused).

Not checked: `positive_data_acceptance`. A schema-valid request can still be refused for facts
only the running server knows (a prompt plus max_tokens over the context, token ids past the
vocabulary), and those 400s are documented.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import Server

ST = Path(sys.executable).parent / "st"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
          "allow_header_conformance")


@pytest.fixture(scope="module")
def server():
    # A small KV cache bounds every generated request (prompt + max_tokens <= 128) to a fraction of
    # a second, whatever max_tokens the fuzzer picks.
    s = Server("--max-pool", "0", "--kv-capacity-tokens", "128", "--request-timeout-s", "30")
    yield s
    assert s.stop() == 0


def test_schemathesis_finds_nothing(server, tmp_path):
    args = [str(ST), "run", server.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "10",
            "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-shrink", "--seed", "8",
            "--generation-database", "none", "--request-timeout", "30", "--no-color"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout, r.stdout[-3000:]
