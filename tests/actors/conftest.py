"""One real local Ray cluster for all actor tests (CPU, logical GPUs declared); it stops
when the actor tests are done, before the serve tests start servers of their own."""
import os
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="package")
def ray_session():
    import ray

    from actors.config import NAMESPACE

    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, namespace=NAMESPACE,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def start_cluster(ray_session):
    """Start a cluster with a given config; shut it down (controller, bases, members) after."""
    from actors.cluster import Cluster

    started = []

    def start(cfg):
        c = Cluster.start(cfg)
        started.append(c)
        return c

    yield start
    for c in started:
        c.shutdown()


def wait_for(pred, timeout_s=60.0, every_s=0.1, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
