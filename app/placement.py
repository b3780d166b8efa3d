"""Where each phase's replicas run: GPU type, node group, and one bundle per GPU for TP/PP.

Prefill and decode can live on different node groups (prefill on H100s, decode on L40S): a
phase names its accelerator type, custom resources and/or node labels, and this module turns
them into Ray Serve deployment options. No Ray import: the result is plain options, checked
against Ray's own ``DeploymentSchema`` in the tests.

An engine using more than one GPU (``tensor_parallel_size`` x ``pipeline_parallel_size`` > 1)
needs its GPUs reserved together with its replica: a placement group with one bundle per GPU
(the first also holds the replica actor's CPUs), packed on one node by default, and vLLM's
Ray executor, which starts its workers in that group (as Ray Serve LLM does).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PlacementConfig(BaseModel):
    """Node-group placement of one phase (``prefill.placement``, ``decode.placement``)."""

    model_config = ConfigDict(extra="forbid")

    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replica's GPUs must be, e.g. 'H100', "
        "'L40S', 'A100-80G' (Ray's `accelerator_type:<T>` node resource).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources the replica takes, e.g. "
        "{'prefill_node': 1}: only nodes started with that resource (a KubeRay worker group's "
        "rayStartParams) can host it.")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels the replica (and each of its GPU "
        "bundles) must match, e.g. {'pd-phase': 'prefill'} (`ray start --labels`).")
    strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Placement-group strategy when an engine spans several "
        "GPUs: STRICT_PACK keeps a TP group on one node (NVLink).")


def engine_devices(engine_args: dict[str, Any]) -> int:
    """GPUs one engine uses: tensor x pipeline parallel degree."""
    return int(engine_args.get("tensor_parallel_size", 1)) * int(
        engine_args.get("pipeline_parallel_size", 1))


def accelerator_resource(accelerator_type: str) -> str:
    """Ray's node resource for an accelerator type (what ``accelerator_type=`` requests)."""
    return f"accelerator_type:{accelerator_type}"


def engine_placement_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """Engine args a multi-GPU engine needs: vLLM's Ray executor, which starts its workers
    in the replica's placement group (an explicit choice in ``engine_args`` wins)."""
    if engine_devices(engine_args) > 1 and "distributed_executor_backend" not in engine_args:
        return {"distributed_executor_backend": "ray"}
    return {}


def placement_options(placement: PlacementConfig, actor_options: dict[str, Any],
                      engine_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``ray_actor_options``, extra deployment options) for one phase.

    One device: the replica actor itself takes the GPU, with the accelerator type, resources
    and labels as actor options. Several: the actor takes CPUs only and the deployment gets a
    placement group of one GPU bundle per device; vLLM's Ray executor fills the bundles.
    """
    actor = dict(actor_options)
    resources = {**actor.get("resources", {}), **placement.resources}
    devices = engine_devices(engine_args)
    if devices <= 1:
        if resources:
            actor["resources"] = resources
        if placement.accelerator_type:
            actor["accelerator_type"] = placement.accelerator_type
        if placement.label_selector:
            actor["label_selector"] = dict(placement.label_selector)
        return actor, {}

    gpu: dict[str, float] = {"GPU": 1.0}
    if placement.accelerator_type:
        gpu[accelerator_resource(placement.accelerator_type)] = 0.001
    first = {"CPU": float(actor.get("num_cpus", 1)), **gpu, **resources}
    bundles = [first] + [dict(gpu) for _ in range(devices - 1)]
    actor.pop("num_gpus", None)
    actor.pop("accelerator_type", None)
    actor.pop("resources", None)
    actor["num_gpus"] = 0  # the replica's GPUs are its workers' bundles
    deployment: dict[str, Any] = {"placement_group_bundles": bundles,
                                  "placement_group_strategy": placement.strategy}
    if placement.label_selector:
        deployment["placement_group_bundle_label_selector"] = [
            dict(placement.label_selector) for _ in bundles]
    return actor, deployment
