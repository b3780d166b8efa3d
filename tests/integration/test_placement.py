"""Node-group placement on one machine: a Ray cluster of three raylets (``ray.cluster_utils``),
a head and two "node groups" that differ only in their custom resource and node label, as a
KubeRay worker group per phase would (deploy/kuberay/rayservice.yaml).

Each group has CPUs enough for either engine, so only the placement options keep the phases
apart: prefill asks for its group by node *label* (``label_selector``), decode by custom
*resource*. A request then goes through HAProxy on the head, its prompt is prefilled on the
prefill node and its KV read over NIXL by the decode engine on the other node.
"""

from __future__ import annotations

import os

import httpx
import pytest

from app.ports import listen_port
from app.serve_env import serve_env
from tests.integration.actors import alive_replicas
from tests.integration.serve_harness import (
    BLOCK_SIZE,
    MODEL_NAME,
    app_config,
    deploy,
    engine_stats,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PREFILL_LABELS = {"pd-phase": "prefill"}
DECODE_RESOURCES = {"decode_node": 4}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    os.environ.update(serve_env(local=True, isolated=True))
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    nodes = {
        "prefill": c.add_node(num_cpus=2, labels=PREFILL_LABELS, node_ip_address="127.0.0.1"),
        "decode": c.add_node(num_cpus=2, resources=DECODE_RESOURCES,
                             node_ip_address="127.0.0.1"),
    }
    try:
        # The driver would swap 127.0.0.1 for the machine's IP, where this cluster does not
        # listen (it stays on loopback).
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("ray._private.services.resolve_ip_for_localhost", lambda host: host)
            ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                     configure_logging=False)
        port = listen_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        deploy(app_config(
            "disaggregated",
            prefill={"cpu_cores": None, "ray_actor_options": {"num_cpus": 1},
                     "placement": {"label_selector": PREFILL_LABELS}},
            decode={"cpu_cores": None, "ray_actor_options": {"num_cpus": 1},
                    "placement": {"resources": {"decode_node": 1}}},
        ), "pd", "/")
        yield {"base": f"http://127.0.0.1:{port}",
               "nodes": {k: n.node_id for k, n in nodes.items()}, "head": c.head_node.node_id}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()


def _replica_nodes(deployment: str) -> set[str]:
    replicas = alive_replicas("pd", deployment)
    assert replicas, f"no live {deployment} replica"
    return {r.node_id for r in replicas}


def test_each_phase_runs_only_on_its_node_group(cluster):
    assert _replica_nodes("PrefillServer") == {cluster["nodes"]["prefill"]}
    assert _replica_nodes("DecodeServer") == {cluster["nodes"]["decode"]}


def test_request_kv_crosses_node_groups_over_nixl(cluster):
    before = engine_stats("pd", "DecodeServer")
    prompt = "The capital of the node group is " * 12
    with httpx.Client(base_url=cluster["base"], timeout=120) as c:
        r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt,
                                            "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-route"] == "disaggregated"
    assert r.json()["usage"]["completion_tokens"] == 8
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 2 * BLOCK_SIZE

    def moved():
        d = engine_stats("pd", "DecodeServer")
        return d if d["prompt_tokens_total"] - before["prompt_tokens_total"] >= prompt_tokens \
            else None

    after = wait_until(moved, 30, what="decode prompt stats")
    loaded = after["prompt_tokens_external_kv_transfer"] - before[
        "prompt_tokens_external_kv_transfer"]
    # Every full block came from the engine on the prefill node (decode computes the rest).
    assert loaded >= prompt_tokens - BLOCK_SIZE, (before, after)
