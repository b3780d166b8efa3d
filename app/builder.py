"""Build the Ray Serve application from an :class:`AppConfig`.

``serve run serve_configs/local.yaml`` calls :func:`build_app` with the YAML's ``args``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from app.config import AppConfig, PhaseConfig
from app.deployments import AggregatedServer, DecodeServer, PrefillServer


def _engine_options(phase: PhaseConfig) -> dict[str, Any]:
    return {
        "num_replicas": phase.num_replicas,
        "ray_actor_options": phase.ray_actor_options,
        "max_ongoing_requests": phase.max_ongoing_requests,
        # Engine start-up (weights, KV cache, warm-up) takes minutes on big models.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    local = Path(cfg.model.path)
    if local.exists():  # replicas may run elsewhere than the caller's cwd
        cfg.model.path = str(local.resolve())
    raw = cfg.model_dump()
    # The decode (or aggregated) engine replicas are the HTTP ingress: tokens go from vLLM to
    # the socket in-process, with no Ray hop; only the prefill leg crosses replicas.
    if cfg.mode == "aggregated":
        return AggregatedServer.options(**_engine_options(cfg.aggregated)).bind(raw)
    prefill = PrefillServer.options(**_engine_options(cfg.prefill)).bind(raw)
    return DecodeServer.options(**_engine_options(cfg.decode)).bind(raw, prefill)
