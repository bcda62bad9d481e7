import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Unit tests are Ray-free: fail fast if one tries to start a cluster."""
    try:
        import ray
    except ImportError:
        return

    def forbidden(*args, **kwargs):
        raise RuntimeError("unit tests must not call ray.init; put the test under tests/actors")

    monkeypatch.setattr(ray, "init", forbidden)
