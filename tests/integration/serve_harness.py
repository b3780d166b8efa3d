"""Start one local Ray cluster and Serve instance per test module, bound to loopback."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import httpx

from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S
from app.ports import listen_port
from app.serve_env import serve_env

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "models" / "tiny-llama"
MODEL_NAME = "tiny-llama"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048


def app_config(mode: str, **overrides: Any) -> dict[str, Any]:
    """The tiny-model app: prefill on core 0, decode on core 1, quiet logs, loopback NIXL."""
    cfg: dict[str, Any] = {
        "model": {"path": str(TINY_MODEL), "served_model_name": MODEL_NAME},
        "mode": mode,
        "engine_args": {
            "max_model_len": MAX_MODEL_LEN,
            "block_size": BLOCK_SIZE,
            "enforce_eager": True,
            "kv_cache_memory_bytes": 512 * 1024 * 1024,
        },
        "prefill": {"cpu_cores": ["0"], "ray_actor_options": {"num_cpus": 1}},
        "decode": {"cpu_cores": ["1"], "ray_actor_options": {"num_cpus": 1}},
        "aggregated": {"cpu_cores": ["0"], "ray_actor_options": {"num_cpus": 1}},
        "nixl": {"side_channel_host": "127.0.0.1"},
        "routing": {"prefill_timeout_s": 20, "policy": "power_of_two"},
        "engine_process": {"shm_busy_loop_s": SMALL_HOST_SHM_BUSY_LOOP_S},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


_saved_env: dict[str, str | None] = {}


def start_serve(num_cpus: int = 4, env: dict[str, str] | None = None,
                metrics_export_port: int | None = None) -> int:
    """A fresh local Ray cluster and Serve on a free loopback port; returns the port.
    ``env``: extra Ray settings for this cluster (its processes inherit them).
    ``metrics_export_port``: where Ray's metrics agent serves Prometheus text (``/metrics``);
    None = Ray's choice."""
    import ray
    from ray import serve

    if not (TINY_MODEL / "config.json").exists():
        raise RuntimeError(f"{TINY_MODEL} missing: run `make model` (make test builds it)")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    # Tested as users run it: HAProxy in front, engine replicas serving HTTP themselves.
    if ray.is_initialized():
        # A module whose set-up failed half-way must not fail every module after it with
        # "ray.init twice": its own error is reported; this one starts clean. (Before this
        # module's settings: stopping restores the environment the earlier one changed.)
        warnings.warn("a Ray cluster of an earlier test module was still connected: "
                      "shut it down before starting this module's", stacklevel=2)
        stop_serve()
    os.environ.update(serve_env(local=True, isolated=True))
    for key, value in (env or {}).items():
        _saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        **({"_metrics_export_port": metrics_export_port} if metrics_export_port else {}),
    )
    try:
        port = listen_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except BaseException:
        stop_serve()  # the caller's try/finally has not begun: nothing else would stop it
        raise
    return port


def deploy(cfg: dict[str, Any], name: str, route_prefix: str) -> None:
    from ray import serve

    from app.builder import build_app

    serve.run(build_app(cfg), name=name, route_prefix=route_prefix)


def deploy_config(cfg: dict[str, Any], name: str, route_prefix: str,
                  app_autoscaling_policy: str | None = None, timeout_s: float = 300) -> None:
    """Deploy as ``serve run <yaml>`` does (a config, not a bound app): only a config carries
    an application-level ``autoscaling_policy``."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    app: dict[str, Any] = {"name": name, "route_prefix": route_prefix,
                           "import_path": "app.builder:build_app", "args": cfg}
    if app_autoscaling_policy:
        app["autoscaling_policy"] = {"policy_function": app_autoscaling_policy}
    serve_start().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))

    def running() -> bool:
        from ray import serve

        status = serve.status().applications.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"app {name} failed to deploy: {status.message}")
        return status is not None and status.status == "RUNNING"

    wait_until(running, timeout_s, interval=1.0, what=f"app {name} RUNNING")


def stop_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        for key, value in _saved_env.items():  # the next module's cluster starts as usual
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_env.clear()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def engine_handle(app_name: str, deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app_name)


def engine_stats(app_name: str, deployment: str) -> dict[str, Any]:
    return engine_handle(app_name, deployment).stats.remote().result(timeout_s=60)


def client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=httpx.Timeout(120.0))


def router_state(app_name: str) -> dict[str, Any]:
    """The KV router's view (``KVRouter.state``): pools, replicas, their last reports."""
    from ray import serve

    return serve.get_deployment_handle("KVRouter", app_name=app_name).state.remote().result(
        timeout_s=30)


def live_replicas(app_name: str, pool: str) -> dict[str, Any]:
    """The pool's replicas the router takes as alive, with their router state."""
    return {r: s for r, s in router_state(app_name)["pools"][pool].items() if s["alive"]}
