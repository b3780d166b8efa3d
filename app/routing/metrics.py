"""Prometheus metrics of KV-aware routing, exported through Ray's metrics agent.

Names follow vLLM's ``vllm:prefix_cache_*`` style where one exists (``pd:`` prefix for ours).
Created lazily so that importing this module never needs a Ray worker.
"""

from __future__ import annotations

import functools
from typing import Any

LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100]
TOKEN_ERROR_BOUNDARIES = [1, 16, 64, 256, 1024, 4096, 16384]  # Ray: all > 0

# Every name defined below (app.metrics.definitions lists them with the app's other metrics).
METRIC_NAMES = (
    "pd_router_decisions_total", "pd_router_latency_ms", "pd_router_predicted_cached_tokens_total",
    "pd_router_prompt_tokens_total", "pd_prefix_cache_predicted_tokens_total",
    "pd_prefix_cache_actual_tokens_total", "pd_prefix_cache_prediction_error_tokens",
)


@functools.cache
def router_metrics():
    from ray.serve.metrics import Counter, Histogram

    return {
        "decisions": Counter("pd_router_decisions_total",
                             description="Routing decisions, by route taken.",
                             tag_keys=("route",)),
        "latency": Histogram("pd_router_latency_ms",
                             description="Time to answer one /internal/route call.",
                             boundaries=LATENCY_BOUNDARIES_MS),
        "predicted": Counter("pd_router_predicted_cached_tokens_total",
                             description="Prompt tokens the router expected cached, by pool.",
                             tag_keys=("pool",)),
        "prompt": Counter("pd_router_prompt_tokens_total",
                          description="Prompt tokens routed.", tag_keys=("pool",)),
    }


@functools.cache
def replica_metrics():
    from ray.serve.metrics import Counter, Histogram

    return {
        "predicted": Counter("pd_prefix_cache_predicted_tokens_total",
                             description="Cached prompt tokens the router predicted for the "
                             "requests this replica prefilled.", tag_keys=("phase",)),
        "actual": Counter("pd_prefix_cache_actual_tokens_total",
                          description="Prompt tokens the engine found in its prefix cache "
                          "(vLLM num_cached_tokens) for those requests.",
                          tag_keys=("phase",)),
        "error": Histogram("pd_prefix_cache_prediction_error_tokens",
                           description="|predicted - actual| cached tokens per request.",
                           boundaries=TOKEN_ERROR_BOUNDARIES, tag_keys=("phase",)),
    }


def record_prediction(phase: str, predicted: int, actual: int) -> None:
    """One prefilled request: the router's predicted cached tokens vs the engine's."""
    m = replica_metrics()
    tags = {"phase": phase}
    inc(m["predicted"], predicted, tags)
    inc(m["actual"], actual, tags)
    m["error"].observe(abs(predicted - actual), tags=tags)


def inc(counter: Any, value: float, tags: dict[str, str]) -> None:
    """Ray counters refuse 0; a zero increment is simply nothing to add."""
    if value > 0:
        counter.inc(value, tags=tags)
