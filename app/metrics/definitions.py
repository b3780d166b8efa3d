"""Every metric the app defines: name, type, labels, buckets. Pure data (no Ray import).

Ray's metrics agent exports them with a ``ray_`` prefix (``pd_ttft_seconds`` is scraped as
``ray_pd_ttft_seconds_bucket``...) and adds ``deployment``/``replica``/``application`` (Ray
Serve) and ``WorkerId``/``NodeAddress``/``SessionName`` labels. ``phase`` is the engine phase the
value is about: ``prefill``, ``decode`` or ``aggregated``.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.routing.metrics import METRIC_NAMES as ROUTING_METRIC_NAMES

EXPORT_PREFIX = "ray_"  # what Ray's Prometheus exporter puts before every application metric

# Seconds. Ray wants every boundary > 0.
TTFT_BUCKETS_S = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                  1.5, 2.5, 5.0, 10.0, 20.0, 40.0]
TPOT_BUCKETS_S = [0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                  0.075, 0.1, 0.2, 0.5, 1.0]
REQUEST_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                     160.0]
TRANSFER_BUCKETS_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ("phase",)
    boundaries: tuple[float, ...] = ()


def _c(name: str, description: str, *tags: str) -> MetricSpec:
    return MetricSpec(name, "counter", description, ("phase", *tags))


def _g(name: str, description: str, *tags: str) -> MetricSpec:
    return MetricSpec(name, "gauge", description, ("phase", *tags))


def _h(name: str, description: str, buckets: list[float], *tags: str) -> MetricSpec:
    return MetricSpec(name, "histogram", description, ("phase", *tags), tuple(buckets))


# Recorded by the HTTP front (decode or aggregated replica): the request as the client sees it.
FRONT = {
    "requests": _c("pd_requests_total", "HTTP requests answered, by route taken "
                   "(x-pd-route; 'none' = answered before routing: bad input, 503), "
                   "streaming or not, HTTP status.", "route", "stream", "status"),
    "ttft": _h("pd_ttft_seconds", "Time to first token at the ingress: request arrival to "
               "the first SSE event (stream=true) or to the whole response (stream=false).",
               TTFT_BUCKETS_S, "route", "stream"),
    "tpot": _h("pd_tpot_seconds", "Time per output token after the first, per streamed "
               "request, at the ingress: (last token event - first) / (token events - 1).",
               TPOT_BUCKETS_S, "route"),
    "e2e": _h("pd_request_seconds", "Request arrival to the last byte of the response.",
              REQUEST_BUCKETS_S, "route", "stream"),
    "prefill_leg": _h("pd_prefill_leg_seconds", "The remote prefill leg as the decode "
                      "replica waits for it (Ray hop, prefill queue and compute), by outcome "
                      "(ok, timeout, error, client_error, server_error, no_params); "
                      "phase=prefill.", TTFT_BUCKETS_S, "outcome"),
    "fallbacks": _c("pd_fallbacks_total", "Requests meant to disaggregate that the decode "
                    "replica prefilled itself because remote prefill failed, by reason.",
                    "reason"),
    "migrations": _c("pd_migrations_total", "Requests moved to a peer replica after this "
                     "replica's engine died: rerun (nothing sent yet), continued (mid-stream), "
                     "failed (no peer could take it).", "outcome"),
    "token_one": _c("pd_token_one_total", "Disaggregated streams by which engine's token 1 "
                    "the client got first: prefill (streamed at once, decode continued after "
                    "it) or decode (the usual path; app/handoff/first_token.py says why).",
                    "source"),
}

# Recorded by every engine replica from vLLM's per-step stats (app.engine_stats).
ENGINE = {
    "running": _g("pd_engine_requests_running", "Requests in the engine's running batch."),
    "waiting": _g("pd_engine_requests_waiting", "Requests waiting in the engine's queue."),
    "kv_usage": _g("pd_engine_kv_cache_usage", "Fraction of the engine's KV-cache blocks in "
                   "use (0-1)."),
    "finished": _c("pd_engine_requests_finished_total", "Requests the engine finished "
                   "(a disaggregated request finishes once on each phase)."),
    "prompt_tokens": _c("pd_engine_prompt_tokens_total", "Prompt tokens by where their KV "
                        "came from: computed, local_cache_hit (prefix cache), "
                        "external_kv_transfer (NIXL from a prefill engine).", "source"),
    "generation_tokens": _c("pd_engine_generation_tokens_total", "Tokens generated."),
    "cache_queries": _c("pd_engine_prefix_cache_queries_total", "Prompt tokens looked up in "
                        "the engine's prefix cache (all requests)."),
    "cache_hits": _c("pd_engine_prefix_cache_hits_total", "... and found there: the actual "
                     "cache hits to compare with pd_router_predicted_cached_tokens_total."),
    "kv_bytes": _c("pd_kv_transfer_bytes_total", "KV-cache bytes moved by NIXL transfers this "
                   "engine took part in (the decode side reads them)."),
    "kv_transfers": _c("pd_kv_transfers_total", "NIXL KV transfers."),
    "kv_failures": _c("pd_kv_transfer_failures_total", "NIXL KV transfers that failed."),
    "kv_seconds": _h("pd_kv_transfer_seconds", "Duration of one NIXL KV transfer.",
                     TRANSFER_BUCKETS_S),
    "ttft": _h("pd_engine_ttft_seconds", "Engine-side time to first token: arrival at this "
               "engine to its first token (decode: includes waiting for the KV transfer; "
               "prefill: the prefill itself).", TTFT_BUCKETS_S),
    "tpot": _h("pd_engine_tpot_seconds", "Engine-side mean time per output token of each "
               "finished request that generated two or more.", TPOT_BUCKETS_S),
    "queue": _h("pd_engine_queue_seconds", "Time each finished request waited in the "
                "engine's queue.", TTFT_BUCKETS_S),
}

ALL_SPECS: tuple[MetricSpec, ...] = (*FRONT.values(), *ENGINE.values())

METRIC_NAMES: frozenset[str] = frozenset(s.name for s in ALL_SPECS) | frozenset(
    ROUTING_METRIC_NAMES)


def exported_names(name: str, kind: str) -> list[str]:
    """The sample names Prometheus scrapes for one metric (``ray_`` prefix; histograms as
    ``_bucket``/``_sum``/``_count``)."""
    base = EXPORT_PREFIX + name
    if kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]


def base_metric_name(sample: str) -> str:
    """``ray_pd_ttft_seconds_bucket`` -> ``pd_ttft_seconds``; ``ray_vllm_x`` -> ``vllm_x``."""
    name = sample[len(EXPORT_PREFIX):] if sample.startswith(EXPORT_PREFIX) else sample
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and not name.endswith("_total" + suffix):
            stem = name[: -len(suffix)]
            if stem in METRIC_NAMES or stem.startswith("vllm_"):
                return stem
    return name
