import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

pytestmark = pytest.mark.gpu


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="package")
def ray_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import ray

    from actors.config import NAMESPACE

    ray.init(namespace=NAMESPACE, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
