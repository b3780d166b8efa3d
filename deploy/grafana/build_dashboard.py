"""Writes pd-serve-dashboard.json (Grafana, Prometheus datasource variable).

    python deploy/grafana/build_dashboard.py

Metric names are what Ray's metrics agent exports: ``ray_`` + the name the code defines
(app/metrics/definitions.py, app/routing/metrics.py) or vLLM's name with ``:`` as ``_``.
tests/unit/test_metrics_dashboard.py checks every expression against those definitions.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("pd-serve-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application=~"$application"'
RI = "$__rate_interval"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str, by: str, where: str = APP, qs=(0.5, 0.99)) -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{where}}}"
              f"[{RI}])))", f"p{int(p * 100)} {{{{{by}}}}}") for p in qs]


_next_id = iter(range(1, 1000))


def panel(title: str, targets: list[dict], unit: str = "short", description: str = "",
          kind: str = "timeseries") -> dict:
    return {"id": next(_next_id), "type": kind, "title": title, "description": description,
            "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}}


def row(title: str) -> dict:
    return {"id": next(_next_id), "type": "row", "title": title, "collapsed": False,
            "panels": []}


def layout(items: list[dict]) -> list[dict]:
    """Rows full width, panels 8 wide, three per line."""
    y, x = 0, 0
    for item in items:
        if item["type"] == "row":
            if x:
                y, x = y + 8, 0
            item["gridPos"] = {"x": 0, "y": y, "w": 24, "h": 1}
            y += 1
            continue
        item["gridPos"] = {"x": x, "y": y, "w": 8, "h": 8}
        x += 8
        if x >= 24:
            y, x = y + 8, 0
    return items


def panels() -> list[dict]:
    return layout([
        row("Client view (ingress: decode / aggregated replicas)"),
        panel("TTFT p50/p99 by route (client)", quantiles("ray_pd_ttft_seconds", "route"), "s",
              "Request arrival at the ingress to the first SSE event (streams) or the whole "
              "response."),
        panel("TPOT p50/p99 by route (client)", quantiles("ray_pd_tpot_seconds", "route"), "s",
              "Per streamed request: (last token event - first) / (token events - 1)."),
        panel("Request latency p50/p99 by route",
              quantiles("ray_pd_request_seconds", "route"), "s"),
        panel("Requests/s by route", [q(f"sum by (route) (rate(ray_pd_requests_total{{{APP}}}"
                                        f"[{RI}]))", "{{route}}")], "reqps",
              "x-pd-route: disaggregated, aggregated, local-prefill:*, fallback; none = "
              "answered before routing (bad input, 503)."),
        panel("Requests/s by HTTP status", [q(f"sum by (status) (rate(ray_pd_requests_total"
                                              f"{{{APP}}}[{RI}]))", "{{status}}")], "reqps"),
        panel("Router decisions/s by plan", [q(f"sum by (route) (rate("
                                               f"ray_pd_router_decisions_total{{{APP}}}"
                                               f"[{RI}]))", "{{route}}")], "reqps"),
        row("Per phase (engine side)"),
        panel("Engine TTFT p50/p99 by phase", quantiles("ray_pd_engine_ttft_seconds", "phase"),
              "s", "Arrival at the engine to its first token; decode includes the KV "
              "transfer wait, prefill is the prefill itself."),
        panel("Engine TPOT p50/p99 by phase", quantiles("ray_pd_engine_tpot_seconds", "phase"),
              "s"),
        panel("Prefill leg p50/p99 by outcome (seen from decode)",
              quantiles("ray_pd_prefill_leg_seconds", "outcome"), "s"),
        panel("Queue: waiting and running requests by phase", [
            q(f"sum by (phase) (ray_pd_engine_requests_waiting{{{APP}}})", "waiting {{phase}}"),
            q(f"sum by (phase) (ray_pd_engine_requests_running{{{APP}}})", "running {{phase}}"),
        ]),
        panel("KV-cache usage by replica", [
            q(f"max by (phase, replica) (ray_pd_engine_kv_cache_usage{{{APP}}})",
              "{{phase}} {{replica}}")], "percentunit"),
        panel("Engine queue time p50/p99 by phase",
              quantiles("ray_pd_engine_queue_seconds", "phase"), "s"),
        panel("Engine throughput by phase", [
            q(f"sum by (phase) (rate(ray_pd_engine_requests_finished_total{{{APP}}}[{RI}]))",
              "finished req/s {{phase}}"),
            q(f"sum by (phase) (rate(ray_pd_engine_generation_tokens_total{{{APP}}}[{RI}]))",
              "generated tok/s {{phase}}")]),
        row("KV transfer (NIXL), fallbacks, migrations"),
        panel("KV transfer bytes/s by phase", [
            q(f"sum by (phase) (rate(ray_pd_kv_transfer_bytes_total{{{APP}}}[{RI}]))",
              "{{phase}}")], "Bps"),
        panel("KV transfer time p50/p99 by phase",
              quantiles("ray_pd_kv_transfer_seconds", "phase"), "s"),
        panel("KV transfers/s and failures/s", [
            q(f"sum by (phase) (rate(ray_pd_kv_transfers_total{{{APP}}}[{RI}]))",
              "transfers {{phase}}"),
            q(f"sum by (phase) (rate(ray_pd_kv_transfer_failures_total{{{APP}}}[{RI}]))",
              "failed {{phase}}")], "ops"),
        panel("Fallbacks to local prefill by reason", [
            q(f"sum by (reason) (increase(ray_pd_fallbacks_total{{{APP}}}[$__range]))",
              "{{reason}}")], "short", "Remote prefill failed (timeout, error, "
              "server_error, no_params) or no prefill deployment (no_prefill).",
              kind="bargauge"),
        panel("Migrations by outcome", [
            q(f"sum by (outcome) (increase(ray_pd_migrations_total{{{APP}}}[$__range]))",
              "{{outcome}}")], "short", kind="bargauge"),
        panel("Fallback and migration rate", [
            q(f"sum(rate(ray_pd_fallbacks_total{{{APP}}}[{RI}]))", "fallbacks/s"),
            q(f"sum(rate(ray_pd_migrations_total{{{APP}}}[{RI}]))", "migrations/s")], "ops"),
        panel("Token 1 of disaggregated streams, by engine", [
            q(f"sum by (source) (rate(ray_pd_token_one_total{{{APP}}}[{RI}]))",
              "{{source}}")], "ops", "prefill: streamed at once, the KV handoff overlaps the "
              "client reading it; decode: the usual path (see app/handoff/first_token.py)."),
        row("Prefix cache: router predicted vs engine actual"),
        panel("Cached prompt tokens/s: predicted vs actual (routed requests)", [
            q(f"sum by (phase) (rate(ray_pd_prefix_cache_predicted_tokens_total{{{APP}}}"
              f"[{RI}]))", "predicted {{phase}}"),
            q(f"sum by (phase) (rate(ray_pd_prefix_cache_actual_tokens_total{{{APP}}}"
              f"[{RI}]))", "actual {{phase}}")], "short",
              "Per request prefilled on a router-chosen replica: the router's predicted "
              "cached tokens vs vLLM's num_cached_tokens."),
        panel("Router predicted vs engine prefix-cache hits (all requests)", [
            q(f"sum by (pool) (rate(ray_pd_router_predicted_cached_tokens_total{{{APP}}}"
              f"[{RI}]))", "router predicted {{pool}}"),
            q(f"sum by (phase) (rate(ray_pd_engine_prefix_cache_hits_total{{{APP}}}[{RI}]))",
              "engine hits {{phase}}")], "short"),
        panel("Prompt tokens/s by source and phase", [
            q(f"sum by (phase, source) (rate(ray_pd_engine_prompt_tokens_total{{{APP}}}"
              f"[{RI}]))", "{{phase}} {{source}}")], "short",
              "computed, local_cache_hit (prefix cache), external_kv_transfer (NIXL)."),
        panel("Prediction error p50/p99 (tokens)",
              quantiles("ray_pd_prefix_cache_prediction_error_tokens", "phase"), "short"),
        panel("Engine prefix-cache hit rate by phase", [
            q(f"sum by (phase) (rate(ray_pd_engine_prefix_cache_hits_total{{{APP}}}[{RI}])) "
              f"/ sum by (phase) (rate(ray_pd_engine_prefix_cache_queries_total{{{APP}}}"
              f"[{RI}]))", "{{phase}}")], "percentunit"),
        panel("Router latency p50/p99", [
            q(f"histogram_quantile({p}, sum by (le) (rate(ray_pd_router_latency_ms_bucket"
              f"{{{APP}}}[{RI}])))", f"p{int(p * 100)}") for p in (0.5, 0.99)], "ms"),
        row("vLLM engine metrics by phase (RayPrometheusStatLogger)"),
        panel("vLLM running / waiting by phase", [
            q(f"sum by (phase) (ray_vllm_num_requests_running{{{APP}}})", "running {{phase}}"),
            q(f"sum by (phase) (ray_vllm_num_requests_waiting{{{APP}}})",
              "waiting {{phase}}")]),
        panel("vLLM KV-cache usage by phase", [
            q(f"max by (phase) (ray_vllm_kv_cache_usage_perc{{{APP}}})", "{{phase}}")],
            "percentunit"),
        panel("vLLM TTFT p50/p99 by phase",
              quantiles("ray_vllm_time_to_first_token_seconds", "phase"), "s"),
        panel("vLLM inter-token latency p50/p99 by phase",
              quantiles("ray_vllm_inter_token_latency_seconds", "phase"), "s"),
        panel("vLLM prompt and generation tokens/s by phase", [
            q(f"sum by (phase) (rate(ray_vllm_prompt_tokens_total{{{APP}}}[{RI}]))",
              "prompt {{phase}}"),
            q(f"sum by (phase) (rate(ray_vllm_generation_tokens_total{{{APP}}}[{RI}]))",
              "generation {{phase}}")]),
        panel("vLLM NIXL transfer time p50/p99 by phase",
              quantiles("ray_vllm_nixl_xfer_time_seconds", "phase"), "s"),
    ])


def dashboard() -> dict:
    return {
        "title": "pd-serve: prefill/decode disaggregation",
        "uid": "pd-serve",
        "tags": ["pd-serve", "ray-serve", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            {"name": "application", "label": "Serve application", "type": "query",
             "datasource": DS, "query": "label_values(ray_pd_requests_total, application)",
             "definition": "label_values(ray_pd_requests_total, application)",
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
