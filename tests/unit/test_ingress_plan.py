"""`fapool serve --ingress`, resolved before Ray starts (serve/ingress.py)."""
from __future__ import annotations

import socket

import pytest

from serve.ingress import direct_ingress_env, plan


def test_auto_is_direct_only_on_a_cluster_this_command_starts():
    ing = plan("auto", True, "127.0.0.1", 0)
    assert ing.mode == "direct" and ing.proxy_port > 0
    assert plan("auto", False, "127.0.0.1", 8000) == plan("proxy", True, "127.0.0.1", 8000)
    assert plan("proxy", True, "127.0.0.1", 8000).proxy_port == 8000  # the proxy holds --port


def test_direct_on_a_joined_cluster_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"--ingress direct.*--ingress proxy"):
        plan("direct", False, "127.0.0.1", 8000)


def test_a_port_in_use_is_refused_by_number():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--port {port} on 127.0.0.1 is already in use"):
            plan("direct", True, "127.0.0.1", port)


def test_the_replica_port_range_holds_exactly_the_port():
    env = direct_ingress_env(65535)
    lo, hi = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(lo, hi)) == [65535]  # Ray Serve's allocator takes range(min, max)
