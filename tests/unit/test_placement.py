"""Per-phase placement: what reaches Ray Serve for one-GPU and multi-GPU engines, and every
committed serve config validated against Ray's schemas and ours, built into deployments."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from app.config import AppConfig
from app.placement import PlacementConfig, engine_placement_args, placement_options

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").glob("*.yaml"))


def test_single_device_puts_node_group_on_the_replica_actor():
    actor, deployment = placement_options(
        PlacementConfig(accelerator_type="L40S", resources={"decode_node": 1},
                        label_selector={"pd-phase": "decode"}),
        {"num_gpus": 1, "num_cpus": 4}, {"max_num_seqs": 256})
    assert actor == {"num_gpus": 1, "num_cpus": 4, "accelerator_type": "L40S",
                     "resources": {"decode_node": 1}, "label_selector": {"pd-phase": "decode"}}
    assert deployment == {}


def test_default_placement_changes_nothing():
    assert placement_options(PlacementConfig(), {"num_cpus": 1}, {}) == ({"num_cpus": 1}, {})


def test_tensor_parallel_gets_one_gpu_bundle_per_device():
    actor, deployment = placement_options(
        PlacementConfig(accelerator_type="H100", resources={"prefill_node": 1},
                        label_selector={"pd-phase": "prefill"}),
        {"num_gpus": 2, "num_cpus": 4}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    assert actor == {"num_cpus": 4, "num_gpus": 0}
    gpu = {"GPU": 1.0, "accelerator_type:H100": 0.001}
    assert deployment["placement_group_bundles"] == [
        {"CPU": 4.0, **gpu, "prefill_node": 1}, gpu, gpu, gpu]
    assert deployment["placement_group_strategy"] == "STRICT_PACK"
    assert deployment["placement_group_bundle_label_selector"] == [{"pd-phase": "prefill"}] * 4
    DeploymentSchema(name="x", ray_actor_options=actor, **deployment)  # Ray accepts it


def test_multi_gpu_engine_uses_rays_executor_unless_chosen():
    assert engine_placement_args({"tensor_parallel_size": 2}) == {
        "distributed_executor_backend": "ray"}
    assert engine_placement_args({"tensor_parallel_size": 2,
                                  "distributed_executor_backend": "mp"}) == {}
    assert engine_placement_args({}) == {}
    cfg = AppConfig.model_validate({"model": {"path": "/m", "served_model_name": "m"},
                                    "prefill": {"engine_args": {"tensor_parallel_size": 2}}})
    assert cfg.engine_kwargs("prefill", "cuda")["distributed_executor_backend"] == "ray"
    assert "distributed_executor_backend" not in cfg.engine_kwargs("decode", "cuda")


def test_unknown_placement_key_is_an_error():
    with pytest.raises(ValueError, match="accelerator"):
        AppConfig.model_validate({"model": {"path": "/m", "served_model_name": "m"},
                                  "prefill": {"placement": {"accelerator": "H100"}}})


def test_gpu_engine_kwargs_stage_kv_in_gpu_memory():
    """The `kv_buffer_device: cuda` path: both roles hand vLLM's NixlConnector a CUDA buffer."""
    cfg = AppConfig.model_validate({"model": {"path": "/m", "served_model_name": "m"},
                                    "nixl": {"kv_buffer_device": "cuda"}})
    from app.deployments import _kv_buffer_device

    assert _kv_buffer_device("cuda") == "cuda"
    for role in ("prefill", "decode"):
        kv = cfg.engine_kwargs(role, _kv_buffer_device(cfg.nixl.kv_buffer_device))
        assert kv["kv_transfer_config"]["kv_buffer_device"] == "cuda"
        assert kv["kv_transfer_config"]["kv_connector"] == "NixlConnector"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_validates_and_builds(path, monkeypatch):
    """Ray's ServeDeploySchema, our AppConfig, then the app built into deployments whose
    options Ray's DeploymentSchema accepts: what `serve run` / KubeRay would deploy."""
    from ray.serve._private.build_app import build_app as ray_build
    from ray.serve.deployment import deployment_to_schema

    from app.builder import build_app

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)
    for spec in doc["applications"]:
        built = ray_build(build_app(AppConfig.model_validate(spec["args"])), name=spec["name"])
        for dep in built.deployments:
            deployment_to_schema(dep)


def test_heterogeneous_config_places_phases_on_their_node_groups(monkeypatch):
    from ray.serve._private.build_app import build_app as ray_build

    from app.builder import build_app

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    doc = yaml.safe_load((CONFIGS[0].parent / "gpu_heterogeneous.yaml").read_text())
    built = ray_build(build_app(doc["applications"][0]["args"]), name="pd")
    deps = {d.name: d for d in built.deployments}
    prefill, decode = deps["PrefillServer"], deps["DecodeServer"]
    bundles = prefill._replica_config.placement_group_bundles
    assert [b.get("accelerator_type:H100") for b in bundles] == [0.001, 0.001]
    assert prefill._replica_config.placement_group_strategy == "STRICT_PACK"
    opts = decode._replica_config.ray_actor_options
    assert opts["accelerator_type"] == "L40S" and opts["resources"] == {"decode_node": 1}
    assert opts["label_selector"] == {"pd-phase": "decode"}
    policy = decode._deployment_config.autoscaling_config.policy
    assert policy.policy_kwargs["settings"]["decode"]["profile"] == "l40s-llama-3.1-8b"


@pytest.mark.parametrize(("policy", "plane", "router"), [
    ("power_of_two", True, "PrefillPoolRouter"),  # publishes the replicas the plane needs
    ("power_of_two", False, "PowerOfTwoChoicesRequestRouter"),
    ("kv", True, "PrefillPoolRouter"),
    ("prefix_affinity", True, "PrefixCacheAffinityRouter"),  # the plane is not used there
])
def test_prefill_request_router_follows_policy_and_prefill_plane(policy, plane, router,
                                                                 monkeypatch):
    from ray.serve._private.build_app import build_app as ray_build

    from app.builder import build_app

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    cfg = AppConfig.model_validate({"model": {"path": "models/tiny-llama",
                                              "served_model_name": "tiny-llama"},
                                    "routing": {"policy": policy},
                                    "handoff": {"prefill_plane": plane}})
    assert cfg.uses_prefill_plane == (plane and policy != "prefix_affinity")
    deps = {d.name: d for d in ray_build(build_app(cfg), name="pd").deployments}
    chosen = deps["PrefillServer"]._deployment_config.request_router_config
    assert chosen.get_request_router_class().__name__ == router
