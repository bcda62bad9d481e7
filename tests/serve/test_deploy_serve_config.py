"""The contract's metrics and the Serve config: Ray Serve's own pydantic schema, the CLI's flags."""
import copy
import importlib

import pytest

from tests.helpers.deploy import (
    APP_ARGS,
    CONTRACT_METRICS,
    DEPLOY,
    check_serve_config,
    fapool_app,
    load_yaml,
)


def test_contract_metrics_match_serve_metrics():
    """The app exports exactly the contract's metrics: the dashboard tests rely on this list."""
    from serve.metrics import METRIC_NAMES

    assert set(METRIC_NAMES) == set(CONTRACT_METRICS)


# ---------------------------------------------------------------- Serve config

def test_serve_config_validates_with_serve_schema():
    raw = load_yaml(DEPLOY / "serve_config.yaml")
    config = check_serve_config(raw)
    assert config.http_options.host == "127.0.0.1"
    assert config.http_options.port == 8000
    (app,) = config.applications
    assert (app.name, app.import_path, app.route_prefix) == ("fapool", "serve.app:build_app", "/")


def test_serve_config_args_are_the_cli_flags_with_defaults():
    args = fapool_app(load_yaml(DEPLOY / "serve_config.yaml"))["args"]
    assert set(args) == APP_ARGS
    assert args["model"] == "tiny"
    assert args["device"] in {"auto", "cpu", "cuda"}
    assert isinstance(args["base_actors"], int) and args["base_actors"] >= 1
    assert isinstance(args["max_pool"], int) and 0 <= args["max_pool"] <= 32
    assert args["pool_curve"] == "4096:8,8192:16,16384:24,32768:32"
    points = [tuple(map(int, p.split(":"))) for p in args["pool_curve"].split(",")]
    assert points == sorted(points) and all(0 < size <= 32 for _, size in points)
    assert isinstance(args["pool_cooldown_s"], float) and args["pool_cooldown_s"] >= 0
    assert args["accelerator_type"] is None and args["api_key"] is None


def test_serve_config_args_build_the_app_with_cli_defaults():
    """The args are what `fapool serve` uses by default, and build_app accepts them (no Ray needed)."""
    from ray.serve import Application

    from serve.cli import parser

    app_config = fapool_app(load_yaml(DEPLOY / "serve_config.yaml"))
    module_name, attr = app_config["import_path"].split(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    args = app_config["args"]
    assert isinstance(build_app(dict(args)), Application)
    defaults = vars(parser().parse_args(["serve"]))
    assert {key: defaults[key] for key in args} == args


def test_serve_config_rejects_wrong_types():
    raw = load_yaml(DEPLOY / "serve_config.yaml")
    from pydantic import ValidationError

    bad = copy.deepcopy(raw)
    bad["http_options"]["port"] = "eight thousand"
    with pytest.raises(ValidationError):
        check_serve_config(bad)
    bad = copy.deepcopy(raw)
    bad["applications"][0]["import_pth"] = "serve.app:build_app"
    with pytest.raises(AssertionError):
        check_serve_config(bad)
