"""Observability end to end: the disaggregated app (KV router, HAProxy, prefill + decode
vLLM-CPU engines, NIXL) serves N requests, then Ray's metrics export port is scraped and every
metric of docs/OBSERVABILITY.md must be there with the values the traffic implies.

A second small app whose prefill always times out produces fallbacks. Ray's metrics agent
flushes every few seconds, so the scrape is polled until the counters settle.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from app.metrics.scrape import buckets, by_label, parse_prometheus, total
from app.ports import listen_port
from tests.integration.serve_harness import (
    MODEL_NAME,
    app_config,
    client,
    deploy,
    live_replicas,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

APP, FB = "pd", "fb"
_WORDS = "cache block prefill decode engine token stream replica router latency batch".split()
N_FALLBACK = 2


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def cluster():
    metrics_port = listen_port()
    port = start_serve(num_cpus=6, metrics_export_port=metrics_port)
    try:
        routing = {"policy": "kv", "prefill_timeout_s": 30, "advertise_host": "127.0.0.1"}
        deploy(app_config("disaggregated", routing=routing), APP, "/pd")
        # Prefill never answers within 1 ms: every request falls back to local prefill.
        deploy(app_config("disaggregated", routing={"prefill_timeout_s": 0.001},
                          prefill={"cpu_cores": None}, decode={"cpu_cores": None}),
               FB, "/fb")
        wait_until(lambda: live_replicas(APP, "decode") and live_replicas(APP, "prefill"), 120,
                   what="router sees the replicas")
        base = f"http://127.0.0.1:{port}"
        yield {"pd": f"{base}/pd", "fb": f"{base}/fb",
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        stop_serve()


def _post(url: str, path: str, body: dict) -> tuple[httpx.Response, str]:
    """(response, its body text): streams are read to the end."""
    with client(url) as c:
        if body.get("stream"):
            with c.stream("POST", path, json=body) as r:
                text = "".join(r.iter_text())
            return r, text
        r = c.post(path, json=body)
        return r, r.text


def _requests() -> list[tuple[str, dict]]:
    long_a = words(1, 400)  # > local_prefill_max_tokens (256): disaggregated
    reqs = [
        ("/v1/completions", {"prompt": long_a, "max_tokens": 8}),
        ("/v1/completions", {"prompt": long_a, "max_tokens": 8}),  # same prefix: cache hits
        ("/v1/completions", {"prompt": words(2, 400), "max_tokens": 12, "stream": True}),
        ("/v1/completions", {"prompt": words(3, 400), "max_tokens": 12, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": words(4, 400)}],
                                  "max_tokens": 10, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": words(5, 300)}],
                                  "max_tokens": 6}),
        ("/v1/completions", {"prompt": words(6, 20), "max_tokens": 8}),  # short: local
        ("/v1/completions", {"prompt": words(7, 20), "max_tokens": 8, "stream": True}),
    ]
    return [(path, {"model": MODEL_NAME, "temperature": 0, "ignore_eos": True, **body})
            for path, body in reqs]


@pytest.fixture(scope="module")
def traffic(cluster):
    """Send the requests one after another; what the client saw."""
    routes: collections.Counter[str] = collections.Counter()
    streamed_multi = 0
    for path, body in _requests():
        r, text = _post(cluster["pd"], path, body)
        assert r.status_code == 200, text
        routes[r.headers["x-pd-route"]] += 1
        if body.get("stream"):
            assert text.rstrip().endswith("data: [DONE]")
            streamed_multi += body["max_tokens"] > 1
    # Invalid input: the front answers 400 before any route (the engines never see it).
    bad, _ = _post(cluster["pd"], "/v1/completions", {"model": MODEL_NAME, "prompt": "x",
                                                      "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
    for i in range(N_FALLBACK):
        r, text = _post(cluster["fb"], "/v1/completions",
                        {"model": MODEL_NAME, "prompt": words(20 + i, 100), "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-pd-route"] == "fallback", text
    return {"n": sum(routes.values()), "routes": dict(routes), "streamed": streamed_multi}


def _scrape(url: str) -> dict:
    return parse_prometheus(httpx.get(url, timeout=10, trust_env=False).text)


@pytest.fixture(scope="module")
def scraped(cluster, traffic):
    """Poll the export port until every counter the traffic implies has been flushed."""
    n = traffic["n"]

    def settled():
        s = _scrape(cluster["metrics"])
        ok = (total(s, "ray_pd_requests_total", application=APP, status="200") == n
              and total(s, "ray_pd_ttft_seconds_count", application=APP) == n
              and total(s, "ray_pd_engine_requests_finished_total", application=APP,
                        phase="decode") >= n
              and total(s, "ray_pd_fallbacks_total", application=FB) == N_FALLBACK
              # counted when the answer is done, so possibly flushed after the fallback
              and total(s, "ray_pd_requests_total", application=FB,
                        route="fallback") == N_FALLBACK
              and total(s, "ray_pd_prefill_leg_seconds_count", application=FB,
                        outcome="timeout") == N_FALLBACK
              and total(s, "ray_vllm_time_to_first_token_seconds_count", application=APP,
                        phase="decode") >= n
              # the router is another process, flushed on its own schedule
              and total(s, "ray_pd_router_decisions_total", application=APP) >= n
              and total(s, "ray_pd_router_predicted_cached_tokens_total",
                        application=APP) > 0)
        return s if ok else None

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        last = settled()
        if last:
            dump = os.environ.get("PD_METRICS_DUMP")  # where to keep the scrape, to look at
            if dump:
                Path(dump).write_text(httpx.get(cluster["metrics"], timeout=10,
                                                trust_env=False).text)
            return last
        time.sleep(2)
    s = _scrape(cluster["metrics"])
    names = sorted(k for k in s if "pd_" in k or "vllm" in k)
    pytest.fail(f"metrics did not settle; exported: {json.dumps(names)[:3000]}")


def test_requests_by_route_match_what_the_client_saw(scraped, traffic):
    n = traffic["n"]
    assert total(scraped, "ray_pd_requests_total", application=APP, status="200") == n
    routes = by_label(scraped, "ray_pd_requests_total", "route", application=APP, status="200")
    assert routes == traffic["routes"]
    assert sum(routes.values()) == n
    assert traffic["routes"].get("disaggregated", 0) >= 4
    assert traffic["routes"].get("local-prefill:short", 0) >= 1
    # the bad request: counted, answered before any route
    bad = {(lbl["route"], lbl["status"]): v for lbl, v in scraped["ray_pd_requests_total"]
           if lbl.get("application") == APP and lbl["status"] != "200"}
    assert bad == {("none", "400"): 1}
    streams = by_label(scraped, "ray_pd_requests_total", "stream", application=APP,
                       status="200")
    assert streams == {"true": 4, "false": 4}
    # the router saw each POST (the bad one included, as 'none')
    assert total(scraped, "ray_pd_router_decisions_total", application=APP) >= n


def test_ttft_tpot_and_latency_histograms(scraped, traffic):
    n = traffic["n"]
    assert total(scraped, "ray_pd_ttft_seconds_count", application=APP) == n
    assert total(scraped, "ray_pd_request_seconds_count", application=APP) == n
    assert total(scraped, "ray_pd_tpot_seconds_count", application=APP) == traffic["streamed"]
    ttft_sum = total(scraped, "ray_pd_ttft_seconds_sum", application=APP)
    assert 0 < ttft_sum / n < 30  # seconds: plausible on 2 cores
    tpot = total(scraped, "ray_pd_tpot_seconds_sum", application=APP) / traffic["streamed"]
    assert 0 < tpot < 2
    bounds, cum = buckets(scraped, "ray_pd_ttft_seconds", application=APP)
    assert bounds and cum[-1] == n and cum == sorted(cum)
    labels = {frozenset(lbl.items()) for lbl, _ in scraped["ray_pd_ttft_seconds_count"]}
    assert all(dict(lbl)["phase"] == "decode" for lbl in labels if dict(lbl).get(
        "application") == APP)
    # the prefill leg of every disaggregated request, phase=prefill
    disagg = traffic["routes"]["disaggregated"]
    assert total(scraped, "ray_pd_prefill_leg_seconds_count", application=APP,
                 phase="prefill", outcome="ok") == disagg


def test_engine_side_per_phase(scraped, traffic):
    n, disagg = traffic["n"], traffic["routes"]["disaggregated"]
    finished = by_label(scraped, "ray_pd_engine_requests_finished_total", "phase",
                        application=APP)
    assert finished["decode"] == n and finished["prefill"] == disagg
    for name in ("ray_pd_engine_requests_running", "ray_pd_engine_requests_waiting",
                 "ray_pd_engine_kv_cache_usage"):
        phases = by_label(scraped, name, "phase", application=APP)
        assert set(phases) == {"prefill", "decode"}, name
    usage = by_label(scraped, "ray_pd_engine_kv_cache_usage", "phase", application=APP)
    assert all(0 <= v <= 1 for v in usage.values())
    assert total(scraped, "ray_pd_engine_ttft_seconds_count", application=APP,
                 phase="decode") == n
    assert total(scraped, "ray_pd_engine_tpot_seconds_count", application=APP,
                 phase="decode") == n
    sources = by_label(scraped, "ray_pd_engine_prompt_tokens_total", "source",
                       application=APP, phase="decode")
    assert sources["external_kv_transfer"] > 0 and sources["computed"] > 0
    assert total(scraped, "ray_pd_engine_generation_tokens_total", application=APP,
                 phase="decode") > 0


def test_kv_transfer_bytes_and_time(scraped, traffic):
    disagg = traffic["routes"]["disaggregated"]
    assert total(scraped, "ray_pd_kv_transfer_bytes_total", application=APP,
                 phase="decode") > 0
    transfers = total(scraped, "ray_pd_kv_transfers_total", application=APP, phase="decode")
    assert 1 <= transfers <= 4 * disagg
    assert total(scraped, "ray_pd_kv_transfer_seconds_count", application=APP,
                 phase="decode") == transfers
    assert total(scraped, "ray_pd_kv_transfer_failures_total", application=APP) == 0


def test_router_predicted_vs_actual_cache_hits(scraped, traffic):
    """The repeated prompt: the router predicts its blocks cached where it sends it (decode,
    as local-prefill:cached, or prefill), and that engine finds them."""
    predicted = by_label(scraped, "ray_pd_router_predicted_cached_tokens_total", "pool",
                         application=APP)
    assert sum(predicted.values()) > 0
    per_request = by_label(scraped, "ray_pd_prefix_cache_predicted_tokens_total", "phase",
                           application=APP)
    actual = by_label(scraped, "ray_pd_prefix_cache_actual_tokens_total", "phase",
                      application=APP)
    assert sum(per_request.values()) > 0 and sum(actual.values()) > 0
    for phase, tokens in per_request.items():  # the pools the router predicted hits for
        assert predicted.get(phase, 0) >= tokens
    assert 0 < sum(actual.values()) <= 2 * sum(per_request.values()) + 64  # same magnitude
    hits = by_label(scraped, "ray_pd_engine_prefix_cache_hits_total", "phase",
                    application=APP)
    queries = by_label(scraped, "ray_pd_engine_prefix_cache_queries_total", "phase",
                       application=APP)
    assert sum(hits.values()) >= sum(actual.values())
    assert all(queries[p] >= hits[p] for p in hits)
    if traffic["routes"].get("local-prefill:cached"):
        assert actual.get("decode", 0) > 0


def test_fallbacks_and_migrations(scraped):
    assert by_label(scraped, "ray_pd_fallbacks_total", "reason", application=FB) == {
        "timeout": N_FALLBACK}
    assert total(scraped, "ray_pd_requests_total", application=FB, route="fallback") == (
        N_FALLBACK)
    assert total(scraped, "ray_pd_prefill_leg_seconds_count", application=FB,
                 outcome="timeout") == N_FALLBACK
    assert total(scraped, "ray_pd_fallbacks_total", application=APP) == 0
    # No engine died: no migration (Ray exports a counter once it is first incremented).
    assert total(scraped, "ray_pd_migrations_total") == 0


def test_vllm_engine_metrics_carry_phase(scraped, traffic):
    n, disagg = traffic["n"], traffic["routes"]["disaggregated"]
    for name in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting",
                 "ray_vllm_kv_cache_usage_perc"):
        assert set(by_label(scraped, name, "phase", application=APP)) == {"prefill", "decode"}
    ttft = by_label(scraped, "ray_vllm_time_to_first_token_seconds_count", "phase",
                    application=APP)
    assert ttft["decode"] == n and ttft["prefill"] == disagg
    assert total(scraped, "ray_vllm_inter_token_latency_seconds_count", application=APP,
                 phase="decode") > 0
    assert total(scraped, "ray_vllm_nixl_xfer_time_seconds_count", application=APP,
                 phase="decode") > 0
    assert all(lbl.get("phase") in ("prefill", "decode")
               for lbl, _ in scraped["ray_vllm_num_requests_running"]
               if lbl.get("application") == APP)


def test_gauges_survive_an_idle_engine(cluster, scraped):
    """Ray drops a gauge series not set for two report intervals (20 s by default); the
    replicas re-set theirs every second, so an idle engine still shows its queue and KV."""
    time.sleep(25)
    s = _scrape(cluster["metrics"])
    for name in ("ray_pd_engine_requests_running", "ray_pd_engine_kv_cache_usage",
                 "ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc"):
        assert set(by_label(s, name, "phase", application=APP)) == {"prefill", "decode"}, name
    assert total(s, "ray_pd_engine_requests_running", application=APP) == 0
