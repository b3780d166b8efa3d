"""Build the Ray Serve application from an :class:`AppConfig`.

``serve run serve_configs/local.yaml`` calls :func:`build_app` with the YAML's ``args``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.config import AppConfig, PhaseConfig
from app.deployments import (
    AggregatedEngineServer,
    AggregatedServer,
    DecodeEngineServer,
    DecodeServer,
    KVRouterServer,
    PrefillServer,
)
from app.front_server import FrontServer
from app.placement import placement_options

_POOL_ROUTERS = "app.routing.pool_routers"
# Ray Serve LLM's router, by its implementation path: the public re-export in ray.serve.llm
# imports all of Ray LLM (pyarrow and cloud filesystems) for one class.
PREFIX_AFFINITY_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware."
                          "prefix_aware_router:PrefixCacheAffinityRouter")


def _engine_options(cfg: AppConfig, name: str) -> dict[str, Any]:
    phase: PhaseConfig = getattr(cfg, name)
    actor, placement = placement_options(phase.placement, phase.ray_actor_options,
                                         cfg.engine_kwargs(name, "auto"))
    return {
        **_replicas(cfg, name, phase),
        **placement,
        "ray_actor_options": actor,
        "max_ongoing_requests": phase.max_ongoing_requests,
        # Engine start-up (weights, KV cache, warm-up) takes minutes on big models.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


def _replicas(cfg: AppConfig, name: str, phase: PhaseConfig) -> dict[str, Any]:
    """A fixed count, or Ray autoscaling driven by our policy. Ray's own delays and factors
    are neutral: the coordinator (autoscaling/coordinator.py) owns hysteresis and cooldowns,
    so the simulator runs the same decisions."""
    s = cfg.autoscaling
    if not s.enabled:
        return {"num_replicas": phase.num_replicas}
    bounds = getattr(s, name)
    return {"autoscaling_config": {
        "min_replicas": bounds.min_replicas,
        "initial_replicas": phase.num_replicas,
        "max_replicas": bounds.max_replicas,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "downscale_to_zero_delay_s": 0,
        "look_back_period_s": s.look_back_period_s,
        "metrics_interval_s": s.metrics_interval_s,
        "policy": {"policy_function": "autoscaling.policies:PhasePolicy",
                   "policy_kwargs": {"phase": name, "settings": s.model_dump()}},
    }}


def _router(cls: str) -> dict[str, Any]:
    return {"request_router_config": RequestRouterConfig(request_router_class=cls,
                                                         request_routing_stats_period_s=2)}


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    local = Path(cfg.model.path)
    if local.exists():  # replicas may run elsewhere than the caller's cwd
        cfg.model.path = str(local.resolve())
    if cfg.autoscaling.enabled:
        from autoscaling.profile_model import Profile

        s = cfg.autoscaling
        for owner in (s, s.prefill, s.decode, s.aggregated):
            if owner.profile is None:
                continue
            if Path(owner.profile).exists():  # the policies run in Ray's controller
                owner.profile = str(Path(owner.profile).resolve())
            Profile.load(owner.profile)  # a missing or bad profile fails the deploy
    raw = cfg.model_dump()
    policy = cfg.routing.policy
    if policy == "kv" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        raise ValueError(
            "routing.policy 'kv' needs Ray's HAProxy ingress: start Ray with the settings of "
            "app/serve_env.py, e.g. `env $(python -m app.serve_env) serve run <config>`, or "
            "set routing.policy: power_of_two")
    if cfg.front.mode == "separate":
        return _with_separate_front(cfg, raw)
    # The decode (or aggregated) engine replicas are the HTTP ingress: tokens go from vLLM to
    # the socket in-process, with no Ray hop; only the prefill leg crosses replicas.
    kv = policy == "kv"
    front_router = _router(f"{_POOL_ROUTERS}:DecodePoolRouter") if kv else {}
    if cfg.mode == "aggregated":
        front = AggregatedServer.options(**_engine_options(cfg, "aggregated"), **front_router)
        app = front.bind(raw)
        return app._with_ingress_request_router(KVRouterServer.bind(raw, app)) if kv else app
    prefill = _prefill(cfg, raw)
    app = DecodeServer.options(**_engine_options(cfg, "decode"), **front_router).bind(raw, prefill)
    if kv:
        # HAProxy asks the router (POST /internal/route) which decode replica gets each request.
        app._with_ingress_request_router(KVRouterServer.bind(raw, app, prefill))
    return app


def _prefill(cfg: AppConfig, raw: dict[str, Any]) -> Application:
    # PrefillPoolRouter also publishes the replica set (and their plane endpoints) in the
    # front's process: the prefill plane needs it under power_of_two too.
    pool = f"{_POOL_ROUTERS}:PrefillPoolRouter"
    router_cls = {"kv": pool, "prefix_affinity": PREFIX_AFFINITY_ROUTER,
                  "power_of_two": pool if cfg.uses_prefill_plane else None
                  }.get(cfg.routing.policy)
    router = _router(router_cls) if router_cls else {}
    return PrefillServer.options(**_engine_options(cfg, "prefill"), **router).bind(raw)


def _with_separate_front(cfg: AppConfig, raw: dict[str, Any]) -> Application:
    """FrontServer serves HTTP; engine replicas only answer handles (app/front_server.py)."""
    f = cfg.front
    front = FrontServer.options(num_replicas=f.num_replicas,
                                ray_actor_options=dict(f.ray_actor_options),
                                max_ongoing_requests=f.max_ongoing_requests)
    if cfg.mode == "aggregated":
        engines = AggregatedEngineServer.options(**_engine_options(cfg, "aggregated"))
        return front.bind(raw, engines.bind(raw))
    decode = DecodeEngineServer.options(**_engine_options(cfg, "decode")).bind(raw)
    return front.bind(raw, decode, _prefill(cfg, raw))
