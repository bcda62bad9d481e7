"""KubeRay manifests against the KubeRay CRDs in deploy/kuberay/crds (made strict, as `kubectl apply`
is) plus the operator's own checks; the cluster launcher YAML against Ray's ray-schema.json and
`ray up`'s config preparation. No network, no Ray cluster."""
import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers.deploy import (
    CRDS,
    DEPLOY,
    check_serve_config,
    fapool_app,
    load_single_doc,
    load_yaml,
)


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
