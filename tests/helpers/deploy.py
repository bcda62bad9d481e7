"""What the deploy-file tests share: paths, the contract's metrics, YAML loading."""
import functools
from pathlib import Path

import yaml

from serve.metrics import OPERATOR_METRICS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = DEPLOY / "kuberay" / "crds"

# The contract's metrics (ARCHITECTURE.md section 5) and their Prometheus types.
CONTRACT_METRICS = {
    "fapool_pool_size": "gauge",
    "fapool_pool_target": "gauge",
    "fapool_pool_scale_events_total": "counter",
    "fapool_requests_running": "gauge",
    "fapool_requests_waiting": "gauge",
    "fapool_prompt_tokens_total": "counter",
    "fapool_generation_tokens_total": "counter",
    "fapool_time_to_first_token_seconds": "histogram",
    "fapool_time_per_output_token_seconds": "histogram",
    "fapool_e2e_request_latency_seconds": "histogram",
    "fapool_request_context_tokens": "histogram",
}
# And what an operator needs besides (serve/metrics.py): every name the app exports.
EXPORTED_METRICS = {**CONTRACT_METRICS, **OPERATOR_METRICS}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
LATENCY_HISTOGRAMS = [n for n, kind in CONTRACT_METRICS.items() if kind == "histogram" and n.endswith("_seconds")]

# serve.app:build_app's args: the `fapool serve` flags in snake_case.
APP_ARGS = {"model", "device", "base_actors", "max_pool", "pool_curve", "pool_cooldown_s",
            "accelerator_type", "api_key"}


def load_yaml(path):
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_single_doc(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


@functools.lru_cache(maxsize=None)
def serve_schemas():
    from ray.serve.schema import (
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )
    return ServeDeploySchema, HTTPOptionsSchema, ServeApplicationSchema


def check_serve_config(raw):
    """Validate with Serve's schema; also reject unknown keys, which its models ignore."""
    deploy_schema, http_schema, app_schema = serve_schemas()
    config = deploy_schema.model_validate(raw)
    assert set(raw) <= set(deploy_schema.model_fields), set(raw) - set(deploy_schema.model_fields)
    assert set(raw.get("http_options", {})) <= set(http_schema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(app_schema.model_fields), set(app) - set(app_schema.model_fields)
    return config


def fapool_app(raw):
    apps = [a for a in raw["applications"] if a["name"] == "fapool"]
    assert len(apps) == 1
    return apps[0]
