"""The app owns its cluster: on a real `ray start --head`, a redeploy with new settings applies them
(a new controller with the new policy), and `serve shutdown` leaves no FA Pool actor alive. On a
head started with deploy/README.md's direct-ingress settings, `serve deploy` serves from the replica."""
from __future__ import annotations

import re
import subprocess
import time

import httpx
import yaml

from tests.helpers.listeners import REPLICA, listener
from tests.helpers.ray_head import (REPO, RAY, alive_fapool_actors, free_ports, ray_head,  # noqa: F401
                                    started_head, subprocess_env)
from tests.serve.chaos_helpers import ids_of, reference

SERVE = RAY.replace("/ray", "/serve")


def deploy(head, tmp_path, port, **args):
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "fapool", "import_path": "serve.app:build_app", "route_prefix": "/",
                             "args": {"model": "tiny", "device": "cpu", **args}}]}
    path = tmp_path / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([SERVE, "deploy", str(path), "-a", head["dashboard"]], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def wait_until(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := pred():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_redeploy_applies_new_settings_and_serve_shutdown_stops_every_actor(ray_head, tmp_path):  # noqa: F811
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    c = httpx.Client(base_url=url, timeout=60)
    body = {"prompt_token_ids": ids_of(20, 1), "max_tokens": 4, "temperature": 0}
    deploy(ray_head, tmp_path, port, max_pool=0, pool_curve="4096:8")
    wait_until(lambda: c.get("/ready").status_code == 200, 180, "the first deploy")
    assert c.post("/generate", json=body).status_code == 200 and c.get("/pool").json()["size"] == 0

    deploy(ray_head, tmp_path, port, max_pool=4, pool_curve="16:2", max_cpu_members=2)
    wait_until(lambda: c.get("/pool").json()["max_pool"] == 4 and c.get("/ready").status_code == 200,
               180, "the redeploy")
    assert c.post("/generate", json=body).status_code == 200
    wait_until(lambda: c.get("/pool").json()["size"] == 2, 60, "the new policy to grow the pool")
    # The old app's cluster went with its replica: one base, one controller, the two members.
    wait_until(lambda: sorted(alive_fapool_actors(ray_head["dashboard"])) ==
               ["AttentionPoolActor", "AttentionPoolActor", "BaseActor", "PoolController"], 60,
               "the old cluster to stop")

    res = subprocess.run([SERVE, "shutdown", "-y", "-a", ray_head["dashboard"]], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: alive_fapool_actors(ray_head["dashboard"]) == [] or None, 60,
               "no FA Pool actor to be left after serve shutdown")
    c.close()


def readme_direct_ingress_env() -> dict[str, str]:
    """The Ray Serve settings deploy/README.md tells a cluster's owner to start Ray with."""
    text = (REPO / "deploy" / "README.md").read_text()
    block = next(b for b in text.split("```") if "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in b)
    return dict(tok.split("=", 1) for tok in block.split() if re.fullmatch(r"RAY_SERVE_\w+=\S+", tok))


def test_serve_deploy_on_a_cluster_started_for_direct_ingress_serves_from_the_replica(tmp_path):
    from serve.ingress import direct_ingress_env

    assert readme_direct_ingress_env() == direct_ingress_env(8100)  # the README's recipe is the CLI's
    replica_port, proxy = free_ports(2)
    with started_head(direct_ingress_env(replica_port)) as head:
        deploy(head, tmp_path, proxy)
        body = {"prompt_token_ids": ids_of(12, 4), "max_tokens": 5, "temperature": 0}
        with httpx.Client(base_url=f"http://127.0.0.1:{replica_port}", timeout=60) as c:
            wait_until(lambda: c.get("/ready").status_code == 200, 180, "the replica to serve its port")
            assert listener(replica_port).startswith(REPLICA)
            tokens = c.post("/generate", json=body).json()["token_ids"]
        assert tokens == reference(body["prompt_token_ids"], 5)
        # The proxy serves the same app on its own port.
        r = httpx.post(f"http://127.0.0.1:{proxy}/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["token_ids"] == tokens
        res = subprocess.run([SERVE, "shutdown", "-y", "-a", head["dashboard"]], env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
