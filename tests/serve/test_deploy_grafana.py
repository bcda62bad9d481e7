"""The Grafana dashboard queries only metrics the app exports, and covers every one of them."""
import json
import re

from tests.helpers.deploy import (
    CONTRACT_METRICS,
    DEPLOY,
    EXPORTED_METRICS,
    HISTOGRAM_SUFFIXES,
    LATENCY_HISTOGRAMS,
)


def dashboard():
    return json.loads((DEPLOY / "grafana" / "fapool-dashboard.json").read_text())


def all_panels(dash):
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_exprs():
    return [t["expr"] for p in all_panels(dashboard()) for t in p.get("targets", [])]


def series_to_metric(series):
    """Map a queried series name to its exported metric, or None if the app exports no such series."""
    if EXPORTED_METRICS.get(series) in ("gauge", "counter"):
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series[: -len(suffix)]
        if series.endswith(suffix) and EXPORTED_METRICS.get(base) == "histogram":
            return base
    return None


def test_series_to_metric():
    assert series_to_metric("fapool_prompt_tokens_total") == "fapool_prompt_tokens_total"
    assert series_to_metric("fapool_request_context_tokens_bucket") == "fapool_request_context_tokens"
    assert series_to_metric("fapool_e2e_request_latency_seconds_count") == "fapool_e2e_request_latency_seconds"
    assert series_to_metric("fapool_e2e_request_latency_seconds") is None  # no bare histogram series
    assert series_to_metric("fapool_prompt_tokens") is None
    assert series_to_metric("fapool_pool_size_bucket") is None


def test_dashboard_queries_only_exported_series():
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        names = re.findall(r"\bfapool_[a-z0-9_]+", expr)
        assert names, expr
        for name in names:
            assert series_to_metric(name), f"{name} in {expr!r} is not an exported series"


def test_dashboard_covers_every_exported_metric():
    covered = {series_to_metric(n) for e in dashboard_exprs() for n in re.findall(r"\bfapool_[a-z0-9_]+", e)}
    assert covered == set(EXPORTED_METRICS) and set(CONTRACT_METRICS) <= covered


def test_dashboard_series_are_in_the_apps_exposition():
    """Every series the dashboard queries appears in what GET /metrics serves (scale label included)."""
    from prometheus_client import generate_latest

    from actors.messages import BaseStats
    from fapool.stats import EngineStats
    from serve.metrics import Metrics, Snapshot

    snap = Snapshot()  # one base, holding rows on one pool member: every labelled series present
    snap.bases = [BaseStats(0, 1, 1, 0, 1, 1, 32, 256, (40,), EngineStats(2, 16, 16, 0, 40, 3), ((7, 20, 64),))]
    text = generate_latest(Metrics(lambda: snap).registry).decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    queried = {n for e in dashboard_exprs() for n in re.findall(r"\bfapool_[a-z0-9_]+", e)}
    assert queried <= exposed, queried - exposed
    assert 'fapool_pool_scale_events_total{direction="up"}' in text


def test_dashboard_latency_quantiles():
    exprs = {re.sub(r"\s+", "", e) for e in dashboard_exprs()}
    for metric in LATENCY_HISTOGRAMS:
        for q in ("0.5", "0.9", "0.99"):
            assert any(e.startswith(f"histogram_quantile({q},") and f"{metric}_bucket[" in e and "by(le)" in e
                       for e in exprs), (metric, q)


def test_dashboard_structure():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and 36 <= dash["schemaVersion"] <= 41
    (ds_var,) = [v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (ds_var["type"], ds_var["query"]) == ("datasource", "prometheus")
    panels = list(all_panels(dash))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            expr = target["expr"]
            depth = 0
            for ch in expr:  # brackets balance: a cheap PromQL syntax check
                depth += {"(": 1, ")": -1}.get(ch, 0)
                assert depth >= 0, expr
            assert depth == 0 and expr.count("[") == expr.count("]") and expr.count("{") == expr.count("}"), expr
    assert any(p["type"] == "heatmap" for p in panels)
