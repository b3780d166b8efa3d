"""Deployment manifests (deploy/): in sync with their sources, valid for their platforms, and
consistent with serve_configs/gpu_heterogeneous.yaml's node groups and autoscaling bounds.

- KubeRay: the RayService validates against the RayService CRD's openAPIV3Schema (read from
  ../shared/schemas, see its README; skipped if absent) with unknown fields rejected, as
  kubectl's strict field validation does; KubeRay's own group checks; Ray's autoscaler reads
  the node groups and each phase's replica fits its group.
- Anyscale: the service file loads into the anyscale SDK's ServiceConfig/ComputeConfig.
No network, no Ray cluster.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from app.config import AppConfig
from app.placement import engine_devices, placement_options
from deploy import render

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT.parent / "shared" / "schemas" / "kuberay-ray.io_rayservices.yaml"
SERVE_CONFIG = yaml.safe_load(render.SERVE_CONFIG.read_text())
APP = SERVE_CONFIG["applications"][0]
PHASES = ("prefill", "decode")
GPU_KEY = "nvidia.com/gpu"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load(render.RAYSERVICE)


def app_config() -> AppConfig:
    return AppConfig.model_validate(APP["args"])


def phase_needs(phase: str) -> dict[str, Any]:
    """GPUs per replica, replica bounds and placement of one phase, from the serve config."""
    cfg = app_config()
    spec = getattr(cfg, phase)
    bounds = getattr(cfg.autoscaling, phase)
    gpus = engine_devices({**cfg.engine_args, **spec.engine_args})
    if gpus == 1:
        gpus = int(spec.ray_actor_options.get("num_gpus", 1))
    return {"gpus": gpus, "start": spec.num_replicas, "min": bounds.min_replicas,
            "max": bounds.max_replicas, "placement": spec.placement, "spec": spec}


def nodes_for(replicas: int, gpus_per_replica: int, gpus_per_node: int) -> int:
    return math.ceil(replicas * gpus_per_replica / gpus_per_node)


# --- generated regions ------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(render.RENDERERS), ids=lambda p: p.name)
def test_manifest_is_rendered_from_its_sources(path):
    committed, rendered = render.render_all()[path]
    assert committed == rendered, f"{path.name} is out of date: run `python -m deploy.render`"


def test_ray_env_is_serve_env_for_a_cluster():
    env = render.ray_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY" in env
    # no one-machine settings (a 1 s drain would cut load balancers on other nodes short)
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in env


# --- KubeRay ----------------------------------------------------------------------------------


def _strict_k8s_schema(node: Any) -> Any:
    """The CRD schema as JSON Schema: objects with declared properties reject unknown fields
    (unless x-kubernetes-preserve-unknown-fields), as the API server's strict validation
    does; `x-kubernetes-list-type: set` means unique items. int-or-string fields already carry
    `anyOf: [integer, string]`; formats are checked by :func:`_format_checker`."""
    if isinstance(node, list):
        return [_strict_k8s_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_k8s_schema(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _format_checker():
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    @checker.checks("int32")
    def int32(value):
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def int64(value):
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    @checker.checks("int-or-string")
    def int_or_string(value):
        return isinstance(value, int | str)

    return checker


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: items are unique on their list-map-keys."""
    from jsonschema import ValidationError

    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else item
        if key in seen:
            yield ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
        seen.add(key)


@pytest.fixture(scope="module")
def crd_validator():
    if not CRD_PATH.exists():
        pytest.skip(f"KubeRay RayService CRD not found at {CRD_PATH} (../shared/schemas)")
    from jsonschema import Draft7Validator, validators

    crd = load(CRD_PATH)
    assert crd["spec"]["names"]["kind"] == "RayService"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict_k8s_schema(version["schema"]["openAPIV3Schema"])
    cls = validators.extend(Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    cls.check_schema(schema)
    return cls(schema, format_checker=_format_checker())


def test_rayservice_validates_against_the_kuberay_crd(rayservice, crd_validator):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    errors = sorted(crd_validator.iter_errors(rayservice), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_crd_validator_rejects_what_kubectl_would(rayservice, crd_validator):
    """The strict schema is not vacuous: a misspelt field, a bad quantity, a string where
    an integer goes and a duplicate container port all fail."""
    import copy

    def errors_after(mutate):
        doc = copy.deepcopy(rayservice)
        mutate(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
        return list(crd_validator.iter_errors(doc))

    container = lambda g: g["template"]["spec"]["containers"][0]  # noqa: E731
    assert errors_after(lambda g: g.update(minReplica=1))
    assert errors_after(lambda g: g.update(maxReplicas="4"))
    assert errors_after(lambda g: container(g)["resources"]["limits"].update(cpu="lots"))
    assert errors_after(lambda g: container(g)["ports"].append(dict(container(g)["ports"][0])))


def test_rayservice_passes_kuberays_group_checks(rayservice):
    """What KubeRay's validation.go (ValidateRayServiceSpec/ValidateRayClusterSpec) refuses:
    rayStartParams['labels'] (the group `labels` field replaces it), resources given both in
    rayStartParams and the group `resources` field, invalid label syntax, a name that is not a
    DNS-1035 label."""
    from ray._private.label_utils import validate_node_label_syntax

    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rayservice["metadata"]["name"])
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        params = group.get("rayStartParams", {})
        assert "labels" not in params
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        validate_node_label_syntax(group.get("labels", {}))
        assert group["template"]["spec"]["containers"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"


def test_serve_config_v2_is_the_heterogeneous_serve_config(rayservice):
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded == SERVE_CONFIG
    ServeDeploySchema.model_validate(embedded)
    for app in embedded["applications"]:
        AppConfig.model_validate(app["args"])


def _containers(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        yield group.get("groupName", "head"), group["template"]["spec"]["containers"][0]


def test_every_ray_container_has_the_ray_settings_and_the_hf_token(rayservice):
    containers = list(_containers(rayservice))
    assert [name for name, _ in containers] == ["head", *PHASES]
    for name, container in containers:
        env = {e["name"]: e for e in container["env"]}
        for key, value in render.ray_env().items():
            assert env.get(key, {}).get("value") == value, f"{name}: {key}"
        secret = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (secret["name"], secret["key"]) == (render.HF_SECRET_NAME, render.HF_SECRET_KEY)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts, f"{name}: no shared-memory volume"
        volumes = {v["name"]: v for v in rayservice_group_volumes(rayservice, name)}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def rayservice_group_volumes(rayservice, group_name):
    cluster = rayservice["spec"]["rayClusterConfig"]
    if group_name == "head":
        return cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    return worker_group(rayservice, group_name)["template"]["spec"]["volumes"]


def worker_group(rayservice, name):
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


def test_head_has_no_gpus_and_no_ray_cpus(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    res = head["template"]["spec"]["containers"][0]["resources"]
    assert GPU_KEY not in res.get("limits", {}) and GPU_KEY not in res.get("requests", {})
    assert head["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("phase", PHASES)
def test_worker_group_matches_the_phase_placement_and_bounds(rayservice, phase):
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    need = phase_needs(phase)
    placement = need["placement"]
    group = next(g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                 if g.get("labels", {}).items() >= placement.label_selector.items())
    assert group["groupName"] == phase
    spec = group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    gpus = int(res["limits"][GPU_KEY])
    assert int(res["requests"][GPU_KEY]) == gpus
    assert gpus % need["gpus"] == 0, "a replica's GPUs must fit in one pod (STRICT_PACK)"
    per_pod = gpus // need["gpus"]
    assert group["minReplicas"] == nodes_for(need["min"], need["gpus"], gpus)
    assert group["maxReplicas"] == nodes_for(need["max"], need["gpus"], gpus)
    assert group["replicas"] == nodes_for(need["start"], need["gpus"], gpus)
    for name, amount in placement.resources.items():
        assert float(group["resources"][name]) >= per_pod * amount
    accel = f"accelerator_type:{placement.accelerator_type}"
    assert float(group["resources"][accel]) == 1
    product = spec["nodeSelector"]["nvidia.com/gpu.product"].replace("-", " ")
    assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(product) == (
        placement.accelerator_type)
    cpus = float(res["limits"]["cpu"])
    assert cpus >= per_pod * need["spec"].ray_actor_options.get("num_cpus", 1)


def test_rays_autoscaler_fits_each_phase_replica_on_its_group(rayservice):
    """Ray's own KubeRay autoscaling-config derivation (what the autoscaler sidecar runs)
    reads the groups; each phase's replica (actor or placement-group bundles, from
    app.placement) fits one node of its group and on no other group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {"metadata": {"name": "pd-serve", "namespace": "default"},
          "spec": rayservice["spec"]["rayClusterConfig"]}
    node_types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert node_types["headgroup"]["resources"].get("CPU") == 0
    assert not node_types["headgroup"]["resources"].get("GPU")
    cfg = app_config()
    for phase in PHASES:
        spec = getattr(cfg, phase)
        kwargs = cfg.engine_kwargs(phase, "cuda")
        actor, deployment = placement_options(spec.placement, spec.ray_actor_options, kwargs)
        bundles = deployment.get("placement_group_bundles") or [
            {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0),
             **actor.get("resources", {}),
             f"accelerator_type:{actor['accelerator_type']}": 0.001}]
        demand: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                demand[k] = demand.get(k, 0) + v
        selector = spec.placement.label_selector
        fits = [name for name, nt in node_types.items()
                if nt["labels"].items() >= selector.items()
                and all(nt["resources"].get(k, 0) >= v for k, v in demand.items())]
        assert fits == [phase], (phase, demand, node_types)
        assert node_types[phase]["min_workers"] >= 1


def test_deploy_doc_names_the_manifests():
    deploy_doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    for path in (render.RAYSERVICE, render.ANYSCALE_SERVICE, render.DOCKERFILE):
        assert str(path.relative_to(ROOT)) in deploy_doc


# --- image ------------------------------------------------------------------------------------


def test_image_is_ray_2_60_and_context_excludes_local_state(rayservice):
    dockerfile = render.DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(cu\d+|gpu)", base)
    assert "pip install" in dockerfile and "[gpu]" in dockerfile
    ignored = {line.strip().rstrip("/") for line in
               (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "models", "results", ".git"} <= ignored


# --- Anyscale ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyscale_service():
    from anyscale.service.models import ServiceConfig

    return ServiceConfig.from_yaml(str(render.ANYSCALE_SERVICE))


def test_anyscale_service_loads_into_the_sdk_models(anyscale_service):
    from anyscale.compute_config.models import ComputeConfig, WorkerNodeGroupConfig

    assert anyscale_service.name == "pd-serve"
    assert anyscale_service.ray_version == "2.60.0"
    compute = anyscale_service.compute_config
    assert isinstance(compute, ComputeConfig)
    assert all(isinstance(w, WorkerNodeGroupConfig) for w in compute.worker_nodes)
    assert compute.head_node.resources.get("GPU", 0) == 0
    assert anyscale_service.env_vars == render.ray_env()


def test_anyscale_service_carries_the_same_serve_application(anyscale_service):
    assert anyscale_service.applications == SERVE_CONFIG["applications"]
    assert anyscale_service.proxy_location == SERVE_CONFIG["proxy_location"]
    assert anyscale_service.logging_config == SERVE_CONFIG["logging_config"]
    # Anyscale owns the HTTP listener: the serve config's http_options are host/port only
    assert set(SERVE_CONFIG["http_options"]) <= {"host", "port"}
    assert anyscale_service.http_options is None


@pytest.mark.parametrize("phase", PHASES)
def test_anyscale_worker_group_matches_the_phase(anyscale_service, phase):
    need = phase_needs(phase)
    placement = need["placement"]
    groups = [w for w in anyscale_service.compute_config.worker_nodes
              if (w.labels or {}).items() >= placement.label_selector.items()]
    assert [g.name for g in groups] == [phase]
    group = groups[0]
    gpus = int(group.resources["GPU"])
    assert gpus % need["gpus"] == 0
    per_node = gpus // need["gpus"]
    assert group.min_nodes == nodes_for(need["min"], need["gpus"], gpus)
    assert group.max_nodes == nodes_for(need["max"], need["gpus"], gpus)
    for name, amount in placement.resources.items():
        assert group.resources[name] >= per_node * amount
    assert group.resources[f"accelerator_type:{placement.accelerator_type}"] == 1
    assert group.resources["CPU"] >= per_node * need["spec"].ray_actor_options.get(
        "num_cpus", 1)
