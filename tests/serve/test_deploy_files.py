"""The deploy files parse and validate against the schemas of the programs that read them.

Serve config: Ray Serve's own pydantic schema. KubeRay manifests: the KubeRay CRDs in
deploy/kuberay/crds (made strict, as `kubectl apply` is) plus the operator's own checks.
Cluster launcher YAML: Ray's ray-schema.json and `ray up`'s config preparation. Grafana:
every metric it queries is one the app exports. Dockerfile: structure. No network, no Ray.
"""
import copy
import fnmatch
import functools
import importlib
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

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


# ---------------------------------------------------------------- metrics contract

def test_contract_metrics_match_serve_metrics():
    """The app exports exactly the contract's metrics: the dashboard tests rely on this list."""
    from serve.metrics import METRIC_NAMES

    assert set(METRIC_NAMES) == set(CONTRACT_METRICS)


# ---------------------------------------------------------------- Serve config

@functools.lru_cache(maxsize=None)
def serve_schemas():
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema
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


# ---------------------------------------------------------------- KubeRay manifests

@functools.lru_cache(maxsize=None)
def crd_schema(plural):
    crd = load_yaml(CRDS / f"kuberay-ray.io_{plural}.yaml")
    assert crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema):
    """Forbid unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -2**31 <= value < 2**31


@functools.lru_cache(maxsize=None)
def crd_validator(plural, part=None):
    schema = strict(copy.deepcopy(crd_schema(plural)))
    if part:
        schema = schema["properties"]["spec"]
    return jsonschema.Draft7Validator(schema, format_checker=FORMATS)


def assert_valid(validator, doc):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def assert_operator_rules(cluster):
    """Checks KubeRay's operator makes (utils/validation.go) that the CRD schema cannot express."""
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env, "KubeRay rejects it together with autoscalerOptions.version"
    for pod in pods:
        assert pod.get("restartPolicy", "Never") == "Never", "autoscaler v2 needs restartPolicy Never"
    for group in [head] + groups:
        start = group.get("rayStartParams", {})
        if "resources" in group:
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(start)
        assert "labels" not in start
    assert len({g["groupName"] for g in groups}) == len(groups)
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits and head["rayStartParams"]["num-gpus"] == "0"
    (gpu,) = [g for g in groups if g["groupName"] == "gpu-workers"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu.get("replicas", 0)) == (0, 40, 0)
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert images == {"fapool:latest"}


def test_rayservice_validates_against_crd():
    doc = load_single_doc(DEPLOY / "kuberay" / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert_valid(crd_validator("rayservices"), doc)
    # rayClusterConfig is a RayCluster spec: check it against that CRD too.
    assert_valid(crd_validator("rayclusters", "spec"), doc["spec"]["rayClusterConfig"])
    assert_operator_rules(doc["spec"]["rayClusterConfig"])


def test_rayservice_serves_the_same_app_as_serve_config():
    doc = load_single_doc(DEPLOY / "kuberay" / "rayservice.yaml")
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config = check_serve_config(embedded)
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    local = fapool_app(load_yaml(DEPLOY / "serve_config.yaml"))
    remote = fapool_app(embedded)
    for key in ("import_path", "route_prefix", "args"):
        assert remote[key] == local[key], key


def test_rayjob_validates_against_crd():
    doc = load_single_doc(DEPLOY / "kuberay" / "rayjob-bench.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert_valid(crd_validator("rayjobs"), doc)
    spec = doc["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "-m", "bench.run", "--preset", "paper"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert_valid(crd_validator("rayclusters", "spec"), spec["rayClusterSpec"])
    assert_operator_rules(spec["rayClusterSpec"])


@pytest.mark.parametrize("path, value", [
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"), "forty"),
    (("spec", "rayClusterConfig", "enableInTreeAutoscaling"), "yes"),
    (("spec", "rayClusterConfig", "autoscalerOptions", "version"), "v3"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "rayStartParams", "num-gpus"), 1),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplica"), 40),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "imag"), "x"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"), 2**31),
])
def test_crd_validation_rejects_bad_manifests(path, value):
    doc = load_single_doc(DEPLOY / "kuberay" / "rayservice.yaml")
    bad = copy.deepcopy(doc)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(crd_validator("rayservices").iter_errors(bad))


def test_rayservice_bogus_field_passes_the_raw_crd():
    """Why strict(): the CRD itself allows unknown fields (the API server would prune them)."""
    doc = load_single_doc(DEPLOY / "kuberay" / "rayservice.yaml")
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 40
    assert not list(jsonschema.Draft7Validator(crd_schema("rayservices")).iter_errors(doc))


# ---------------------------------------------------------------- Ray cluster launcher

def ray_cluster_schema():
    import ray.autoscaler
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_cluster_yaml_validates_against_ray_schema():
    config = load_single_doc(DEPLOY / "ray-cluster.yaml")
    jsonschema.validate(config, ray_cluster_schema())
    # The same preparation and validation `ray up` runs (local only, no cloud calls).
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_has_gpu_workers_and_installs_fapool():
    config = load_single_doc(DEPLOY / "ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 1
    assert (gpu[0]["min_workers"], gpu[0]["max_workers"]) == (0, 40)
    assert config["max_workers"] >= 40
    (remote,) = [r for r, local in config["file_mounts"].items() if Path(local) == Path(".")]
    assert any(re.search(rf"pip install .*{re.escape(remote)}", c) for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_ray_cluster_schema_rejects_bad_config():
    config = load_single_doc(DEPLOY / "ray-cluster.yaml")
    schema = ray_cluster_schema()
    for mutate in (
        lambda c: c["available_node_types"]["gpu_worker"].__setitem__("max_workers", "forty"),
        lambda c: c.__setitem__("setup_comands", []),
    ):
        bad = copy.deepcopy(config)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# ---------------------------------------------------------------- Grafana dashboard

def dashboard():
    return json.loads((DEPLOY / "grafana" / "fapool-dashboard.json").read_text())


def all_panels(dash):
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_exprs():
    return [t["expr"] for p in all_panels(dashboard()) for t in p.get("targets", [])]


def series_to_metric(series):
    """Map a queried series name to its contract metric, or None if the app exports no such series."""
    if CONTRACT_METRICS.get(series) in ("gauge", "counter"):
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series[: -len(suffix)]
        if series.endswith(suffix) and CONTRACT_METRICS.get(base) == "histogram":
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


def test_dashboard_covers_every_contract_metric():
    covered = {series_to_metric(n) for e in dashboard_exprs() for n in re.findall(r"\bfapool_[a-z0-9_]+", e)}
    assert covered == set(CONTRACT_METRICS)


def test_dashboard_series_are_in_the_apps_exposition():
    """Every series the dashboard queries appears in what GET /metrics serves (scale label included)."""
    from prometheus_client import generate_latest

    from serve.metrics import Metrics, Snapshot

    text = generate_latest(Metrics(Snapshot).registry).decode()
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


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # comment inside a continuation
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    out = []
    for line in lines:
        instruction, _, rest = line.strip().partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    names = [i for i, _ in instructions]
    args = {}
    for inst, rest in instructions:
        if inst == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value.strip('"'))
    (base,) = [rest for inst, rest in instructions if inst == "FROM"]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
    assert re.match(r"(nvidia/cuda|pytorch/pytorch):\S*(cuda|cudnn|runtime|devel)", base), base

    users = [(k, rest) for k, (inst, rest) in enumerate(instructions) if inst == "USER"]
    entry_at = names.index("ENTRYPOINT")
    assert users and users[-1][0] < entry_at
    assert users[-1][1] not in {"root", "0"} and not users[-1][1].startswith(("root:", "0:"))
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["fapool"]
    assert json.loads(dict(instructions)["CMD"])[0] == "serve"
    exposed = {p for inst, rest in instructions if inst == "EXPOSE" for p in rest.split()}
    assert {"8000", "8265"} <= exposed
    health = dict(instructions)["HEALTHCHECK"]
    assert "/health" in health and "python" in health and "curl" not in health
    runs = " ".join(rest for inst, rest in instructions if inst == "RUN")
    assert re.search(r"pip install [^&;]*\"?\.(\$\{EXTRAS|\"|\s|$)", runs)


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    ignore = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    copied = set()
    for inst, rest in dockerfile_instructions():
        if inst != "COPY":
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            copied.add(source)
            if "*" not in source:  # wildcard sources are optional by design
                assert (ROOT / source).exists(), f"COPY {source}: missing"
            for pattern in ignore:
                assert not fnmatch.fnmatch(source, pattern), f"COPY {source} is excluded by .dockerignore {pattern}"
    for package in re.search(r"include = \[([^\]]*)\]", pyproject).group(1).replace('"', "").split(","):
        assert package.strip().rstrip("*") in copied, f"package {package} not copied into the image"


# ---------------------------------------------------------------- README

def test_deploy_readme_commands_and_paths():
    text = (DEPLOY / "README.md").read_text()
    for command in (
        "fapool serve",
        "ray start --head",
        "serve run deploy/serve_config.yaml",
        "serve deploy deploy/serve_config.yaml",
        "ray job submit --working-dir . -- python -m serve.batch --input prompts.jsonl --output out.jsonl",
        "ray job submit --working-dir . -- python -m bench.run --preset tiny",
        "kubectl apply -f deploy/kuberay/rayservice.yaml",
        "ray up deploy/ray-cluster.yaml",
        "docker build -t fapool:latest .",
        "fapool-dashboard.json",
    ):
        assert command in text, command
    for path in set(re.findall(r"\bdeploy/[\w./-]+\.(?:yaml|json)", text)):
        assert (ROOT / path).exists(), path
    for line in re.findall(r"^\{.*\}$", text, flags=re.M):  # the JSONL example lines parse
        record = json.loads(line)
        assert ("prompt" in record) != ("prompt_token_ids" in record)
