"""Run the disaggregated app briefly, send traffic, scrape Ray's metrics export port, and plot.

    flock /tmp/pd_ray.lock .venv/bin/python bench/metrics_snapshot.py \
        [--out docs/img/metrics_snapshot.png] [--requests 48] [--concurrency 4] [--overhead]

Starts a local Ray cluster (the integration tests' harness: loopback, HAProxy ingress, the
tiny model, KV router), sends a mix of completions and chats (streaming or not, short and long
prompts, a shared prefix for cache hits, a few repeats), samples ``/metrics`` every 2 s while
it runs (queue and KV usage over time), then plots the final scrape with matplotlib: a
rendering of real scraped data, not a Grafana screenshot. ``--overhead`` also times the
recorders in this (Ray-connected) process: per request at the ingress, per engine step for our
engine metrics, and per engine step for vLLM's Ray stat logger against vLLM's default one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.serve_env import serve_env  # noqa: E402

# Ray reads its Serve settings when ray.serve is first imported, here too (the builder checks
# for HAProxy in this process): set them before anything imports it (as tests/conftest.py).
os.environ.update(serve_env(local=True))

from app.metrics.math import quantile_from_buckets  # noqa: E402
from app.metrics.scrape import buckets, by_label, parse_prometheus, total  # noqa: E402
from app.ports import listen_port  # noqa: E402
from tests.integration.serve_harness import (  # noqa: E402
    MODEL_NAME,
    app_config,
    deploy,
    live_replicas,
    start_serve,
    stop_serve,
    wait_until,
)

APP = "pd"
WORDS = "cache block prefill decode engine token stream replica router latency batch".split()
SYSTEM = " ".join(random.Random(0).choice(WORDS) for _ in range(300))


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_requests(n: int, seed: int = 1) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        body: dict = {"model": MODEL_NAME, "temperature": 0, "ignore_eos": True,
                      "max_tokens": rng.choice((8, 16, 32)), "stream": i % 2 == 0}
        if kind == 0:  # short: local prefill on the decode replica
            out.append(("/v1/completions", {**body, "prompt": words(rng, 20)}))
        elif kind in (1, 2):  # shared system prefix: prefix-cache hits on prefill
            out.append(("/v1/chat/completions", {**body, "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": words(rng, 40)}]}))
        else:  # long, distinct
            out.append(("/v1/completions", {**body, "prompt": words(rng, rng.randint(300, 600))}))
    return out


def send(base: str, path: str, body: dict) -> str:
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as c:
        if body.get("stream"):
            with c.stream("POST", path, json=body) as r:
                for _ in r.iter_text():
                    pass
                return r.headers.get("x-pd-route", str(r.status_code))
        r = c.post(path, json=body)
        return r.headers.get("x-pd-route", str(r.status_code))


def scrape(url: str) -> dict:
    return parse_prometheus(httpx.get(url, timeout=10, trust_env=False).text)


def run_traffic(base: str, metrics_url: str, n: int, concurrency: int):
    reqs = make_requests(n)
    routes: dict[str, int] = {}
    lock = threading.Lock()
    it = iter(reqs)
    samples: list[tuple[float, dict]] = []
    done = threading.Event()

    def worker():
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            route = send(base, *item)
            with lock:
                routes[route] = routes.get(route, 0) + 1

    def sampler():
        start = time.monotonic()
        while not done.is_set():
            try:
                s = scrape(metrics_url)
            except httpx.HTTPError:
                s = {}
            samples.append((time.monotonic() - start, {
                k: by_label(s, f"ray_pd_engine_{k}", "phase", application=APP)
                for k in ("requests_running", "requests_waiting", "kv_cache_usage")}))
            done.wait(2.0)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(12)  # keep sampling through a Ray flush after the last request
    done.set()
    t.join()
    return routes, samples


def settle(metrics_url: str, n: int, timeout: float = 120) -> dict:
    def ok():
        s = scrape(metrics_url)
        good = (total(s, "ray_pd_requests_total", application=APP) >= n
                and total(s, "ray_pd_ttft_seconds_count", application=APP) >= n)
        return s if good else None

    return wait_until(ok, timeout, interval=2.0, what="metrics flushed")


# --- overhead ---------------------------------------------------------------------------


def _per_call_us(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def overhead() -> dict[str, float]:
    """Microseconds per call of each recorder, with real Ray metrics in a connected worker."""
    import asyncio

    from app.metrics.math import TransferTotals
    from app.metrics.ray_metrics import EngineMetrics, FrontMetrics

    out: dict[str, float] = {}
    front = FrontMetrics("decode")
    out["front answered (per request)"] = _per_call_us(
        lambda: front.answered(time.perf_counter(), 200, "disaggregated"), 5000)
    chunk = 'data: {"id":"cmpl-1","choices":[{"index":0,"text":" tok"}]}\n\n'

    async def chunks(k):
        for _ in range(k):
            yield chunk

    async def drain(k, wrap):
        src = chunks(k)
        it = front.stream(src, time.perf_counter(), "disaggregated") if wrap else src
        async for _ in it:
            pass

    k, reps = 256, 200
    t_raw = _per_call_us(lambda: asyncio.run(drain(k, False)), reps)
    t_wrapped = _per_call_us(lambda: asyncio.run(drain(k, True)), reps)
    out["front stream wrapper (per token)"] = max(t_wrapped - t_raw, 0) / k
    out["front stream end (per request, 4 records)"] = _per_call_us(
        lambda: asyncio.run(drain(1, True)), 2000) - _per_call_us(
        lambda: asyncio.run(drain(1, False)), 2000)

    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    def decode_step():
        it = IterationStats()
        it.num_generation_tokens = 4
        it.inter_token_latencies_iter = [0.003] * 4
        return SchedulerStats(num_running_reqs=4, num_waiting_reqs=1,
                              kv_cache_usage=0.1), it

    sched, it = decode_step()
    engine = EngineMetrics("decode")
    out["pd engine metrics (per step)"] = _per_call_us(
        lambda: engine.record(sched, it, TransferTotals()), 20000)

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from app.metrics.vllm_logger import phase_stat_logger
    from tests.integration.serve_harness import TINY_MODEL

    cfg = AsyncEngineArgs(model=str(TINY_MODEL), max_model_len=2048, block_size=32,
                          enforce_eager=True, kv_cache_memory_bytes=512 * 1024 * 1024,
                          ).create_engine_config(UsageContext.OPENAI_API_SERVER)
    default = PrometheusStatLogger(cfg, [0])
    ray_phase = phase_stat_logger("decode")(cfg, [0])
    out["vLLM default Prometheus logger (per step)"] = _per_call_us(
        lambda: default.record(sched, it, engine_idx=0), 5000)
    out["vLLM Ray logger + phase (per step)"] = _per_call_us(
        lambda: ray_phase.record(sched, it, engine_idx=0), 5000)
    return out


# --- plot -------------------------------------------------------------------------------


def _q(s, name, qv, **match):
    b, c = buckets(s, name, **match)
    return quantile_from_buckets(b, c, qv)


def _hist_bars(ax, s, name, label_key, title, unit_ms=True):
    series = by_label(s, f"{name}_count", label_key, application=APP)
    for i, value in enumerate(sorted(series)):
        b, c = buckets(s, name, application=APP, **{label_key: value})
        if not c:
            continue
        per = [c[0]] + [c[j] - c[j - 1] for j in range(1, len(b))]
        xs = [x * (1000 if unit_ms else 1) for x in b]
        p50, p99 = quantile_from_buckets(b, c, 0.5), quantile_from_buckets(b, c, 0.99)
        scale = 1000 if unit_ms else 1
        ax.step(xs, per, where="post", label=f"{value} (n={int(c[-1])}, p50 "
                f"{p50 * scale:.1f}, p99 {p99 * scale:.1f})", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("ms (bucket upper bound)" if unit_ms else "bucket upper bound", fontsize=8)
    ax.set_ylabel("requests in bucket", fontsize=8)
    ax.legend(fontsize=6)


def plot(s: dict, samples, out: Path, routes: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    ax = axes.ravel()
    _hist_bars(ax[0], s, "ray_pd_ttft_seconds", "route", "Client TTFT by route "
               "(pd_ttft_seconds)")
    _hist_bars(ax[1], s, "ray_pd_tpot_seconds", "route", "Client TPOT by route, streams "
               "(pd_tpot_seconds)")
    # per-phase latencies, ours and vLLM's
    rows = []
    for label, name in (("pd engine TTFT", "ray_pd_engine_ttft_seconds"),
                        ("vLLM TTFT", "ray_vllm_time_to_first_token_seconds"),
                        ("vLLM ITL", "ray_vllm_inter_token_latency_seconds"),
                        ("pd engine TPOT", "ray_pd_engine_tpot_seconds"),
                        ("prefill leg", "ray_pd_prefill_leg_seconds")):
        for phase in ("prefill", "decode"):
            p50 = _q(s, name, 0.5, application=APP, phase=phase)
            p99 = _q(s, name, 0.99, application=APP, phase=phase)
            if p50 is not None:
                rows.append((f"{label}\n{phase}", p50 * 1000, p99 * 1000))
    xs = range(len(rows))
    ax[2].bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="p50")
    ax[2].bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="p99")
    ax[2].set_xticks(list(xs), [r[0] for r in rows], fontsize=6, rotation=35, ha="right")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("ms", fontsize=8)
    ax[2].set_title("Per-phase latency p50/p99 (phase label)", fontsize=9)
    ax[2].legend(fontsize=7)
    # routes, fallbacks, migrations
    by_route = by_label(s, "ray_pd_requests_total", "route", application=APP)
    names = sorted(by_route)
    ax[3].bar(names, [by_route[n] for n in names], color="C2")
    ax[3].set_title(f"Requests by route (pd_requests_total); fallbacks "
                    f"{int(total(s, 'ray_pd_fallbacks_total', application=APP))}, migrations "
                    f"{int(total(s, 'ray_pd_migrations_total', application=APP))}", fontsize=9)
    ax[3].tick_params(axis="x", labelsize=7)
    # queue over time
    for key, style in (("requests_running", "-"), ("requests_waiting", "--")):
        for j, phase in enumerate(("prefill", "decode")):
            ax[4].plot([t for t, _ in samples], [v[key].get(phase, 0) for _, v in samples],
                       style, color=f"C{j}", label=f"{key.split('_')[1]} {phase}")
    ax[4].set_title("Engine queue over time (pd_engine_requests_running/waiting)", fontsize=9)
    ax[4].set_xlabel("s", fontsize=8)
    ax[4].legend(fontsize=7)
    for j, phase in enumerate(("prefill", "decode")):
        ax[5].plot([t for t, _ in samples],
                   [v["kv_cache_usage"].get(phase, 0) * 100 for _, v in samples],
                   color=f"C{j}", label=phase)
    ax[5].set_title("KV-cache usage over time (pd_engine_kv_cache_usage)", fontsize=9)
    ax[5].set_ylabel("%", fontsize=8)
    ax[5].set_xlabel("s", fontsize=8)
    ax[5].legend(fontsize=7)
    # KV transfer
    _hist_bars(ax[6], s, "ray_pd_kv_transfer_seconds", "phase", "NIXL KV transfer time "
               "(pd_kv_transfer_seconds); bytes: " + ", ".join(
                   f"{p} {v / 1e6:.1f} MB" for p, v in by_label(
                       s, "ray_pd_kv_transfer_bytes_total", "phase", application=APP).items()))
    # predicted vs actual
    labels, pred, act = [], [], []
    router = by_label(s, "ray_pd_router_predicted_cached_tokens_total", "pool",
                      application=APP)
    engine_hits = by_label(s, "ray_pd_engine_prefix_cache_hits_total", "phase",
                           application=APP)
    predicted = by_label(s, "ray_pd_prefix_cache_predicted_tokens_total", "phase",
                         application=APP)
    actual = by_label(s, "ray_pd_prefix_cache_actual_tokens_total", "phase", application=APP)
    for phase in ("prefill", "decode"):
        labels.append(phase)
        pred.append(predicted.get(phase, router.get(phase, 0)))
        act.append(actual.get(phase, 0))
    xs = range(len(labels))
    ax[7].bar([x - 0.2 for x in xs], pred, 0.4, label="router predicted (routed requests)")
    ax[7].bar([x + 0.2 for x in xs], act, 0.4, label="engine actual (num_cached_tokens)")
    ax[7].plot([x + 0.2 for x in xs], [engine_hits.get(p, 0) for p in labels], "k_",
               markersize=20, label="engine prefix-cache hits (all requests)")
    ax[7].set_xticks(list(xs), labels)
    ax[7].set_title("Cached prompt tokens: predicted vs actual", fontsize=9)
    ax[7].legend(fontsize=6)
    # vLLM token counters by phase
    prompt = by_label(s, "ray_vllm_prompt_tokens_total", "phase", application=APP)
    gen = by_label(s, "ray_vllm_generation_tokens_total", "phase", application=APP)
    sources = by_label(s, "ray_pd_engine_prompt_tokens_total", "source", application=APP,
                       phase="decode")
    names = ["vllm prompt\nprefill", "vllm prompt\ndecode", "vllm gen\ndecode",
             *[f"decode\n{k}" for k in sorted(sources)]]
    values = [prompt.get("prefill", 0), prompt.get("decode", 0), gen.get("decode", 0),
              *[sources[k] for k in sorted(sources)]]
    ax[8].bar(names, values, color="C4")
    ax[8].tick_params(axis="x", labelsize=6)
    ax[8].set_title("Tokens by phase (ray_vllm_* with phase label; pd prompt sources)",
                    fontsize=9)
    fig.suptitle(f"pd-serve metrics scraped from Ray's metrics export port after "
                 f"{sum(routes.values())} requests (tiny model, 2 CPU cores): a matplotlib "
                 f"rendering of real scraped data, not a Grafana screenshot", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "metrics_snapshot.png")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--overhead", action="store_true")
    args = ap.parse_args()
    metrics_port = listen_port()
    port = start_serve(num_cpus=4, metrics_export_port=metrics_port,
                       env={"RAY_metrics_report_interval_ms": "2000"})
    try:
        routing = {"policy": "kv", "prefill_timeout_s": 30, "advertise_host": "127.0.0.1"}
        deploy(app_config("disaggregated", routing=routing), APP, "/pd")
        wait_until(lambda: live_replicas(APP, "decode") and live_replicas(APP, "prefill"), 120,
                   what="router sees the replicas")
        base = f"http://127.0.0.1:{port}/pd"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        start = time.monotonic()
        routes, samples = run_traffic(base, metrics_url, args.requests, args.concurrency)
        print(f"traffic: {args.requests} requests in {time.monotonic() - start:.1f}s, "
              f"routes {json.dumps(routes)}")
        s = settle(metrics_url, args.requests)
        summary = {
            "requests_by_route": by_label(s, "ray_pd_requests_total", "route", application=APP),
            "ttft_p50_ms": 1000 * (_q(s, "ray_pd_ttft_seconds", 0.5, application=APP) or 0),
            "tpot_p50_ms": 1000 * (_q(s, "ray_pd_tpot_seconds", 0.5, application=APP) or 0),
            "kv_bytes": by_label(s, "ray_pd_kv_transfer_bytes_total", "phase",
                                 application=APP),
            "exported_pd_metrics": sorted({k for k in s if k.startswith("ray_pd_")}),
            "exported_vllm_metrics": len({k for k in s if k.startswith("ray_vllm_")}),
        }
        print(json.dumps(summary, indent=1))
        plot(s, samples, args.out, routes)
        if args.overhead:
            results = overhead()
            for k, v in results.items():
                print(f"overhead: {k}: {v:.2f} µs")
            print("overhead (median of runs above is what docs quote)", statistics.median(
                list(results.values())))
    finally:
        stop_serve()


if __name__ == "__main__":
    main()
