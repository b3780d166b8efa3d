"""What does the serving path cost? TTFT and TPOT of four setups, measured in one run.

1. ``plain``: one plain vLLM OpenAI server (the floor), engine on core 0;
2. ``aggregated``: this project's app, ``mode: aggregated``, engine on core 0;
3. ``disaggregated``: this project's app, prefill on core 0, decode on core 1, KV over NIXL;
4. ``plain-pd``: two plain vLLM servers with NixlConnector (cores 0 and 1); the client itself
   sends the prefill request, then the decode request with the returned ``kv_transfer_params``;
5. ``disaggregated-nixl-spin``: 3 with NIXL's own 0 µs progress delay (busy polling), to show
   what ``nixl.progress_delay_us`` buys;
6. ``aggregated-ray-proxy``: 2 without the Ray settings of ``app/serve_env.py`` (Ray's Python
   HTTP proxy instead of HAProxy + direct ingress), to show what they buy.
7. ``kv-router``: 3 with ``routing.policy: kv`` (HAProxy asks the KV-aware router for every
   request, engines publish KV events and load), local prefill off so that the request path
   is 3's: what the router itself adds. Setups 3, 5 use ``policy: power_of_two``.
8. ``disaggregated-token1-decode``: 3 with ``handoff.first_token_from_prefill: false`` (decode
   samples token 1 after the KV handoff, as before issue 11), to show what streaming prefill's
   token 1 at once buys.
9. ``disaggregated-front``: 3 with ``front.mode: separate`` (HTTP served by a FrontServer
   replica that reaches decode over a handle, so streams survive a decode replica's death):
   what that costs.
10. ``plain-pd-push``: 4 with vLLM's ``NixlPushConnector`` and early decode admission: the
   client sends the prefill and the decode request *at the same time* (one shared request id,
   decode told the prefill engine's NIXL coordinates up front); decode allocates its blocks
   and registers them with prefill while prefill computes, and prefill WRITEs the KV into them
   when it finishes. The design of ``docs/HANDOFF.md`` measured at the engine level, before
   the app builds it.
11. ``disaggregated-handle``: 3 with ``handoff.prefill_plane: false`` (the prefill leg as a
   Ray Serve handle call instead of over the app's own connection): what the plane buys.
12. ``disaggregated-push``: 3 with ``handoff.transfer: push`` (10's design inside the app:
   the front sends both legs at once, decode samples token 1 after the pushed KV arrives).

The app setups run with ``app/serve_env.py``'s settings unless said otherwise.

Same model, engine settings, prompts (random token ids, unique per request so no prefix-cache
hits) and output lengths for all; concurrency 1 and 4 (closed loop). Writes its section of
``docs/BENCHMARKS.md`` with the command and checks the targets of issue 2 as ratios::

    python bench/serving_overhead.py            # ~20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import READER_PROGRESS_DELAY_US  # noqa: E402
from app.cpu_pinning import describe_affinity, engine_pids, pin_process_tree  # noqa: E402
from app.engine_dtype import vllm_cli_dtype_args  # noqa: E402
from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S  # noqa: E402
from app.ports import listen_port  # noqa: E402
from loadtests.envinfo import hardware, hardware_line  # noqa: E402
from loadtests.mdsection import update_file  # noqa: E402
from loadtests.metrics import percentile  # noqa: E402
from loadtests.servers import (  # noqa: E402
    apply_overrides,
    start_logged,
    start_serve_run,
    stop_process_group,
    wait_ready,
)

SECTION = "bench:serving_overhead"
# Setups compared by a check run next to each other (this machine's speed drifts in minutes).
SETUPS = ("plain", "aggregated", "disaggregated", "disaggregated-push", "disaggregated-handle",
          "disaggregated-token1-decode", "kv-router", "disaggregated-front", "plain-pd",
          "plain-pd-push", "disaggregated-nixl-spin", "aggregated-ray-proxy")
APP_SETUPS = ("aggregated", "disaggregated", "disaggregated-nixl-spin", "aggregated-ray-proxy",
              "kv-router", "disaggregated-token1-decode", "disaggregated-front",
              "disaggregated-handle", "disaggregated-push")
HOST = "127.0.0.1"


def push_engine_id(role: str) -> str:
    """A ``plain-pd-push`` engine's fixed NIXL id: decode names prefill's in its request."""
    return f"plain-pd-push-{role}"


@dataclass
class Sample:
    ttft: float
    tpot: float | None


@dataclass
class Result:
    setup: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def stat(self, name: str, p: float) -> float | None:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        v = percentile(values, p)
        return None if v is None else v * 1000.0


# --- the load --------------------------------------------------------------------------------


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids (special tokens) so every prompt is ordinary text.
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def stream_completion(http: httpx.AsyncClient, url: str, body: dict, t0: float) -> Sample:
    """POST a streaming completion; TTFT from ``t0`` to the first token-bearing event."""
    first = None
    tokens = 0
    async with http.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            got = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
            if got:
                tokens += got
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("no tokens streamed")
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - t0, tpot)


async def one_request(http, setup: str, urls: dict[str, str], body: dict) -> Sample:
    t0 = time.perf_counter()
    if setup == "plain-pd-push":
        return await push_request(http, urls, body, t0)
    if setup != "plain-pd":
        return await stream_completion(http, urls["main"] + "/v1/completions", body, t0)
    prefill = {
        **body,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
    }
    r = await http.post(urls["prefill"] + "/v1/completions", json=prefill)
    r.raise_for_status()
    decode = {**body, "kv_transfer_params": r.json()["kv_transfer_params"]}
    return await stream_completion(http, urls["decode"] + "/v1/completions", decode, t0)


async def push_request(http, urls: dict[str, str], body: dict, t0: float) -> Sample:
    """Both legs at once: vLLM's push connector matches them by the shared request id."""
    rid = uuid.uuid4().hex
    prefill = {**body, "max_tokens": 1, "stream": False, "request_id": rid,
               "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    decode = {**body, "request_id": rid, "kv_transfer_params": {
        "do_remote_prefill": True, "do_remote_decode": False,
        "remote_engine_id": push_engine_id("prefill"), "remote_host": HOST,
        "remote_port": int(urls["prefill_nixl_port"]), "tp_size": 1,
        # Prefill's own id is not known up front; vLLM's connector only uses it for lease
        # heartbeats, which the push path does not need (prefill writes as it finishes).
        "remote_request_id": f"cmpl-{rid}"}}
    leg = asyncio.create_task(http.post(urls["prefill"] + "/v1/completions", json=prefill))
    try:
        sample = await stream_completion(http, urls["decode"] + "/v1/completions", decode, t0)
    finally:
        r = await leg
    r.raise_for_status()
    return sample


async def run_closed_loop(setup: str, urls: dict[str, str], model: str, prompts, concurrency: int,
                          output_len: int) -> Result:
    result = Result(setup, concurrency)
    queue = list(prompts)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as http:

        async def worker():
            while queue:
                prompt = queue.pop()
                body = {"model": model, "prompt": prompt, "max_tokens": output_len,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}
                try:
                    result.samples.append(await one_request(http, setup, urls, body))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    result.errors += 1
                    print(f"  {setup}: request failed: {exc}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


# --- the servers ------------------------------------------------------------------------------


def engine_settings(args) -> dict[str, Any]:
    return {"max_model_len": args.max_model_len, "block_size": 32, "enforce_eager": True,
            "kv_cache_memory_bytes": 1 << 30}


def vllm_server_command(args, port: int, core: int, kv_config: dict | None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(ROOT / args.model_path), "--served-model-name", args.model_name,
           "--host", HOST, "--port", str(port), "--max-model-len", str(args.max_model_len),
           "--block-size", "32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30),
           "--disable-log-stats", "--uvicorn-log-level", "warning",
           *vllm_cli_dtype_args()]  # the app's engines' dtype on this CPU (app/engine_dtype.py)
    if kv_config:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd


def app_serve_config(args, mode: str, port: int, nixl_delay_us: int, reader_delay_us: int,
                     policy: str = "power_of_two", token_one_from_prefill: bool = True,
                     front: str = "engine", prefill_plane: bool = True,
                     transfer: str = "pull") -> dict[str, Any]:
    app_args = {
        "model": {"path": str(ROOT / args.model_path), "served_model_name": args.model_name},
        "mode": mode,
        "engine_args": engine_settings(args),
        "aggregated": {"cpu_cores": ["0"]},
        "prefill": {"cpu_cores": ["0"]},
        "decode": {"cpu_cores": ["1"]},
        "nixl": {"side_channel_host": HOST, "progress_delay_us": nixl_delay_us,
                 "reader_progress_delay_us": reader_delay_us},
        "engine_process": {"shm_busy_loop_s": args.shm_busy_loop_s},
        "routing": {"policy": policy},
        "handoff": {"first_token_from_prefill": token_one_from_prefill,
                    "prefill_plane": prefill_plane, "transfer": transfer},
        "front": {"mode": front},
    }
    if policy == "kv":  # same path as power_of_two (always remote prefill), plus the router
        app_args["routing"].update(local_prefill_max_tokens=0, advertise_host=HOST)
    apply_overrides(app_args, args.set)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": HOST, "port": port},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [{"name": "pd", "route_prefix": "/",
                          "import_path": "app.builder:build_app", "args": app_args}],
    }


def server_env(nixl_delay_us: int | None, shm_busy_loop_s: float | None) -> dict[str, str]:
    """Environment of a bench's servers: loopback NIXL, quiet vLLM, and the engine-process
    plugin's settings (it runs in plain vLLM servers too)."""
    env = {**os.environ, "VLLM_HOST_IP": HOST, "VLLM_NIXL_SIDE_CHANNEL_HOST": HOST,
           "VLLM_LOGGING_LEVEL": "ERROR"}
    if nixl_delay_us is not None:
        env["PD_NIXL_PROGRESS_DELAY_US"] = str(nixl_delay_us)
    if shm_busy_loop_s is not None:
        env["PD_SHM_BUSY_LOOP_S"] = str(shm_busy_loop_s)
    return env


def start_setup(setup: str, args, workdir: Path) -> tuple[list, dict[str, str]]:
    """Start the servers of one setup; returns (processes with ports, urls)."""
    env = server_env(args.nixl_delay_us, args.shm_busy_loop_s)
    procs, urls = [], {}
    to_pin: list[tuple[int, int]] = []  # plain servers: (pid, core), pinned once ready
    if setup in APP_SETUPS:
        port = listen_port()
        mode = "aggregated" if setup.startswith("aggregated") else "disaggregated"
        spin = setup.endswith("spin")  # NIXL's own 0 µs on every engine
        delay, reader_delay = (0, 0) if spin else (args.nixl_delay_us, args.reader_delay_us)
        cfg_path = workdir / f"{setup}.yaml"
        policy = "kv" if setup == "kv-router" else "power_of_two"
        cfg_path.write_text(yaml.safe_dump(app_serve_config(
            args, mode, port, delay, reader_delay, policy,
            setup != "disaggregated-token1-decode",
            "separate" if setup == "disaggregated-front" else "engine",
            prefill_plane=setup != "disaggregated-handle",
            transfer="push" if setup == "disaggregated-push" else "pull"), sort_keys=False))
        proc = start_serve_run(cfg_path, workdir / f"{setup}.log", ROOT, env,
                               fast_ingress=not setup.endswith("ray-proxy"))
        procs.append((proc, port, workdir / f"{setup}.log"))
        urls["main"] = f"http://{HOST}:{port}"
    elif setup == "plain":
        port = listen_port()
        proc = start_logged(vllm_server_command(args, port, 0, None), workdir / "plain.log",
                            ROOT, {**env, "VLLM_CPU_OMP_THREADS_BIND": "0"})
        procs.append((proc, port, workdir / "plain.log"))
        to_pin.append((proc.pid, 0))
        urls["main"] = f"http://{HOST}:{port}"
    else:
        push = setup == "plain-pd-push"
        for role, core in (("prefill", 0), ("decode", 1)):
            port, nixl_port = listen_port(), listen_port()
            kv = {"kv_connector": "NixlPushConnector" if push else "NixlConnector",
                  "kv_buffer_device": "cpu",
                  "kv_role": "kv_producer" if role == "prefill" else "kv_consumer"}
            if push:
                kv["engine_id"] = push_engine_id(role)
            role_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": str(core),
                        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_port)}
            if role == "decode" and not push:  # as the app's pull decode engines
                role_env["PD_NIXL_PROGRESS_DELAY_US"] = str(args.reader_delay_us)
            log = workdir / f"{setup}-{role}.log"
            proc = start_logged(vllm_server_command(args, port, core, kv), log, ROOT, role_env)
            procs.append((proc, port, log))
            to_pin.append((proc.pid, core))
            urls[role] = f"http://{HOST}:{port}"
            if role == "prefill":
                urls["prefill_nixl_port"] = str(nixl_port)
    for proc, port, log in procs:
        wait_ready(f"http://{HOST}:{port}", args.model_name, proc, log, args.startup_timeout)
    for pid, core in to_pin:
        pin_plain_server(pid, core)
    return procs, urls


def pin_plain_server(pid: int, core: int) -> None:
    """Pin a plain vLLM server's engine processes (engine core, worker: every thread) to its
    core and leave its API server process free, as the app pins its engines and not its
    replicas (``app/cpu_pinning.py``). ``taskset`` and ``VLLM_CPU_OMP_THREADS_BIND`` alone left
    the worker where vLLM's own binding put it, measured on the *other* engine's core: prefill
    and decode then shared one core whenever they overlapped."""
    pids = engine_pids(pid)
    pin_process_tree({core}, pids)
    stray = {p: c for p, c in describe_affinity(pids).items() if c != [core]}
    if stray:
        raise RuntimeError(f"could not pin server {pid} to core {core}: {stray}")


# --- report ----------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def checks(results: dict[tuple[str, int], Result]) -> list[tuple[str, str, bool | None]]:
    """(claim, figures, met); met is None for a figure reported without a target."""
    def p50(setup, name):
        return results[(setup, 1)].stat(name, 50)

    def have(*setups: str, c: int = 1) -> bool:  # a run of some setups checks only those
        return all((setup, c) in results for setup in setups)

    rows = []
    if have("aggregated", "plain"):
        a, p = p50("aggregated", "ttft"), p50("plain", "ttft")
        rows.append(("aggregated TTFT p50 ≤ plain + 5 ms", f"{fmt(a)} vs {fmt(p)} + 5",
                     a <= p + 5))
    if have("disaggregated", "aggregated"):
        d, a = p50("disaggregated", "ttft"), p50("aggregated", "ttft")
        rows.append(("disaggregated TTFT p50 ≤ aggregated + 10 ms (concurrency 1; issue 11)",
                     f"{fmt(d)} vs {fmt(a)} + 10", d <= a + 10))

    def lowers(stat: str, better: str, worse: str, claim: str, how: str) -> None:
        """``better`` has a lower ``stat`` p50 than ``worse`` at both concurrencies."""
        for c in (1, 4):
            if not have(better, worse, c=c):
                continue
            b, w = results[(better, c)].stat(stat, 50), results[(worse, c)].stat(stat, 50)
            rows.append((f"{claim} (concurrency {c})", how.format(fmt(b), fmt(w)), b < w))

    lowers("ttft", "disaggregated", "disaggregated-handle",
           "the prefill plane lowers disaggregated TTFT p50",
           "{} vs {} with the prefill leg as a Ray handle call")
    lowers("ttft", "disaggregated", "disaggregated-token1-decode",
           "token 1 from prefill lowers disaggregated TTFT p50",
           "{} vs {} with token 1 from decode")
    if have("disaggregated", "plain-pd"):
        d, h = p50("disaggregated", "ttft"), p50("plain-pd", "ttft")
        rows.append(("disaggregated TTFT p50 ≤ plain P/D + 10 ms",
                     f"{fmt(d)} vs {fmt(h)} + 10", d <= h + 10))
    for c in (1, 4):
        if not have("disaggregated", "aggregated", c=c):
            continue
        dt = results[("disaggregated", c)].stat("tpot", 50)
        at = results[("aggregated", c)].stat("tpot", 50)
        rows.append((f"disaggregated TPOT p50 ≤ 1.2 × aggregated (concurrency {c})",
                     f"{fmt(dt)} vs 1.2 × {fmt(at)} = {fmt(1.2 * at)}", dt <= 1.2 * at))
    if have("kv-router", "disaggregated"):
        k, d1 = p50("kv-router", "ttft"), p50("disaggregated", "ttft")
        rows.append(("KV router adds ≤ 2 ms TTFT p50 over power_of_two (concurrency 1)",
                     f"{fmt(k)} vs {fmt(d1)} + 2", k <= d1 + 2))
    for c in (1, 4):  # a cost to report, not a target: what stream survival is bought with
        if have("disaggregated-front", "disaggregated", c=c):
            f, d = results[("disaggregated-front", c)], results[("disaggregated", c)]
            ttft = f.stat("ttft", 50) - d.stat("ttft", 50)
            rows.append((f"what a separate front (front.mode: separate) costs (concurrency {c})",
                         f"TTFT p50 {ttft:+.1f} ms, TPOT p50 "
                         f"{f.stat('tpot', 50) / d.stat('tpot', 50):.2f}×", None))
    for c in (1, 4):  # push inside the app: reported against pull and aggregated
        if have("disaggregated-push", "disaggregated", "aggregated", c=c):
            u, p = results[("disaggregated-push", c)], results[("disaggregated", c)]
            a = results[("aggregated", c)]
            rows.append((f"the app with handoff.transfer: push vs pull (concurrency {c})",
                         f"TTFT p50 {u.stat('ttft', 50) - p.stat('ttft', 50):+.1f} ms, "
                         f"TPOT p50 {u.stat('tpot', 50) / p.stat('tpot', 50):.2f}× pull's, "
                         f"{u.stat('tpot', 50) / a.stat('tpot', 50):.2f}× aggregated's", None))
    for c in (1, 4):  # the early-admission design, measured on plain vLLM
        if have("plain-pd-push", "plain-pd", c=c):
            u, p = results[("plain-pd-push", c)], results[("plain-pd", c)]
            rows.append((f"plain P/D with push + early decode admission vs pull (concurrency "
                         f"{c})", f"TTFT p50 {u.stat('ttft', 50) - p.stat('ttft', 50):+.1f} ms, "
                         f"TPOT p50 {u.stat('tpot', 50) / p.stat('tpot', 50):.2f}×", None))
    lowers("tpot", "disaggregated", "disaggregated-nixl-spin",
           "NIXL progress delay lowers disaggregated TPOT p50",
           "{} with the delay vs {} busy-polling")
    lowers("ttft", "aggregated", "aggregated-ray-proxy",
           "HAProxy + direct ingress lower aggregated TTFT p50",
           "{} vs {} through Ray's Python proxy")
    return rows


def markdown(args, command: str, results: dict[tuple[str, int], Result]) -> str:
    hw = hardware()
    lines = [
        "## Serving-path overhead: plain vLLM vs this app (issue 2)",
        "",
        f"Generated by `bench/serving_overhead.py` on {datetime.now():%Y-%m-%d %H:%M} "
        f"(commit `{hw.get('git_commit') or '?'}`).",
        "",
        f"- Command: `{command}`",
        f"- Hardware: {hardware_line(hw)}",
        f"- Model: `{args.model_path}`; prompts of {args.input_len} random token ids (unique, "
        f"no prefix-cache hits), {args.output_len} output tokens (`ignore_eos`), greedy; "
        f"{args.requests} requests per point after {args.warmup} warm-up; closed loop.",
        "- Engines: vLLM-CPU, `enforce_eager`, block size 32, 1 GiB KV cache; a single engine "
        "on core 0; P/D: prefill on core 0, decode on core 1, NixlConnector over UCX, NIXL "
        f"progress delay {args.nixl_delay_us} µs ({args.reader_delay_us} µs on decode under "
        "pull, `nixl.reader_progress_delay_us`), vLLM queue-reader spin "
        f"{args.shm_busy_loop_s} s (same settings for the plain servers).",
        "- App topology: the decode (or aggregated) engine replica is the HTTP ingress; Ray "
        "settings of `app/serve_env.py` (HAProxy + direct ingress) except in "
        "`aggregated-ray-proxy`. Routing `power_of_two` except `kv-router` (KV-aware ingress "
        "router, local prefill off: the same disaggregated path plus the router). "
        "Prefill legs over the prefill plane (`handoff.prefill_plane`) except in "
        "`disaggregated-handle`, where they are Ray Serve handle calls (gRPC by value). "
        "`disaggregated-front`: HTTP served by a separate FrontServer replica (no CPU "
        "reserved, unpinned) that reaches the decode replica over a handle. Token 1 of "
        "a disaggregated stream comes from prefill (`handoff.first_token_from_prefill`) "
        "except in `disaggregated-token1-decode`, where decode samples it after the handoff; "
        "TPOT is (last token - first token) / (tokens - 1), so it carries the handoff when "
        "token 1 comes from prefill. Plain servers: engine processes (every thread) pinned to "
        "their core after start-up, API server free (as the app pins engines, not replicas). "
        "`disaggregated-push`: `handoff.transfer: push` (token 1 from decode). "
        "`plain-pd-push`: vLLM's "
        "`NixlPushConnector`, both legs sent at once with one request id.",
        "",
        "| setup | conc | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ok | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (setup, conc), r in results.items():
        lines.append(
            f"| {setup} | {conc} | {fmt(r.stat('ttft', 50))} | {fmt(r.stat('ttft', 99))} | "
            f"{fmt(r.stat('tpot', 50))} | {fmt(r.stat('tpot', 99))} | {len(r.samples)} | "
            f"{r.errors} |")
    lines += ["", "Targets (ratios within this run):", ""]
    for name, detail, ok in checks(results):
        mark = "ℹ️" if ok is None else "✅" if ok else "❌"
        lines.append(f"- {mark} {name}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="models/tiny-llama")
    parser.add_argument("--model-name", default="tiny-llama")
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--nixl-delay-us", type=int, default=100)
    parser.add_argument("--reader-delay-us", type=int, default=READER_PROGRESS_DELAY_US,
                        help="nixl.reader_progress_delay_us (decode engines under pull)")
    parser.add_argument("--shm-busy-loop-s", type=float, default=SMALL_HOST_SHM_BUSY_LOOP_S,
                        help="vLLM queue-reader spin window for every setup (app config; "
                        "plain servers get it from the same plugin); as in local.yaml")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="override an app setting in every app setup (experiments), e.g. "
                        "--set 'routing.bind_host=\"*\"'")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    command = shlex.join(["python", "bench/serving_overhead.py", *raw])
    vocab = json.loads((ROOT / args.model_path / "config.json").read_text())["vocab_size"]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    setups = args.setups.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], Result] = {}
    for setup in setups:
        print(f"== {setup}: starting", file=sys.stderr, flush=True)
        procs, urls = start_setup(setup, args, args.out)
        try:
            for c in concurrencies:
                # Same prompts for every setup at a given concurrency; seeds differ per point.
                prompts = make_prompts(args.requests + args.warmup, args.input_len, vocab,
                                       seed=1000 * c)
                asyncio.run(run_closed_loop(setup, urls, args.model_name,
                                            prompts[: args.warmup], 1, args.output_len))
                r = asyncio.run(run_closed_loop(setup, urls, args.model_name,
                                                prompts[args.warmup:], c, args.output_len))
                results[(setup, c)] = r
                print(f"   {setup} c={c}: TTFT p50 {fmt(r.stat('ttft', 50))} ms, TPOT p50 "
                      f"{fmt(r.stat('tpot', 50))} ms, errors {r.errors}", file=sys.stderr,
                      flush=True)
        finally:
            for proc, port, _ in procs:
                stop_process_group(proc, HOST, port, grace_s=60)
    text = markdown(args, command, results)
    print(text)
    if not args.no_docs and set(setups) == set(SETUPS):
        update_file(args.docs, SECTION, text)
        print(f"wrote section {SECTION} of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
