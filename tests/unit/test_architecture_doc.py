"""docs/architecture.md names every route, flag and metric the code has: each is read from the code
itself (the FastAPI app's routes, the parser of `fapool serve`, the Prometheus registry's metric
families), so a new one that the document does not name fails here."""
from __future__ import annotations

import argparse
from pathlib import Path

DOC = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()


def _routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route; FastAPI >= 0.165 keeps an included router whole."""
    out = []
    for r in routes:
        if hasattr(r, "original_router"):
            out += _routes(r.original_router.routes, prefix + r.include_context.prefix)
        elif getattr(r, "methods", None):
            out += [(m, prefix + r.path) for m in sorted(r.methods - {"HEAD"})]
    return out


def test_every_route_is_named_with_its_method():
    from serve.app import create_app

    routes = _routes(create_app().routes)
    assert len(routes) > 15 and ("POST", "/v1/completions") in routes
    missing = [f"`{m} {p}`" for m, p in routes if f"`{m} {p}`" not in DOC]
    assert not missing, f"docs/architecture.md does not name these routes: {missing}"


def test_every_flag_of_fapool_serve_is_named():
    from serve.cli import parser

    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = [s for a in sub.choices["serve"]._actions for s in a.option_strings
             if s.startswith("--") and s not in ("--help",) and not s.startswith("--no-")]
    assert "--attention-kernel" in flags and "--stream-chunks-per-s" in flags
    missing = [f for f in flags if f"`{f}`" not in DOC]
    assert not missing, f"docs/architecture.md does not name these flags: {missing}"


def test_every_metric_is_named():
    from actors.messages import BaseStats, PoolStatus
    from serve.metrics import METRIC_NAMES, Metrics, Snapshot

    snap = Snapshot()  # one base and a pool status: every family has something to show
    snap.status = PoolStatus(0, 0, 0, (), (), 0, 0, 0, ())
    snap.bases = [BaseStats(0, 0, 0, 0, 0, 0, 0, 0, ())]
    registry = Metrics(lambda: snap).registry
    names = [m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()]
    assert set(METRIC_NAMES) <= set(names)
    missing = [n for n in names if f"`{n}`" not in DOC]
    assert not missing, f"docs/architecture.md does not name these metrics: {missing}"
