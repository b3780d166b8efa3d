"""What does NIXL cost an engine that transfers nothing? Time to first token (the prompt's
forward pass: what a prefill engine does) and steady inter-token time (what a decode engine
does) of plain vLLM servers with and without NixlConnector, or with two NIXL progress-thread
delays.

Two plain vLLM servers run at once, each pinned to one core (every engine thread, as the app
pins its engines); requests alternate between them, one at a time, so neither competes with
the other's compute. A second round swaps the cores, because the two cores of these machines
do not run at the same speed. Reported per server: the median over requests of the time to
the first streamed token, and of the mean gap between tokens 2..n (the first gap is left out:
it holds the prompt's last step).

    python bench/nixl_engine_overhead.py                       # no NIXL vs NIXL at 100 µs
    python bench/nixl_engine_overhead.py --a nixl:100 --b nixl:20000

A server is ``plain``, ``nixl:<progress delay µs>`` (NixlConnector, ``kv_both``, plain
requests) or ``prefill:<µs>`` (a P/D prefill engine: ``kv_producer``, and every request carries
the app's prefill-leg ``kv_transfer_params``, so the connector holds its blocks for a READ
that never comes, as for a prefill leg):

    python bench/nixl_engine_overhead.py --a plain --b prefill:100 --output-len 3

Figures of 2026-12-06 and 2026-12-07 are in docs/HANDOFF.md ("a quiet progress thread on
decode"), of 2026-12-08 in docs/BENCHMARKS.md; this prints, it writes no docs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_overhead import (  # noqa: E402
    HOST,
    pin_plain_server,
    server_env,
    vllm_server_command,
)

from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S  # noqa: E402
from app.pd_requests import PREFILL_KV_PARAMS  # noqa: E402
from app.ports import listen_port  # noqa: E402
from loadtests.servers import start_logged, stop_process_group, wait_ready  # noqa: E402

NIXL = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu", "kv_role": "kv_both"}


async def stream_times(http: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                       max_tokens: int, kv_params: dict | None = None) -> tuple[float, float]:
    """Time to the first token and mean gap between tokens 2..n of one greedy stream,
    seconds."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    stamps = []
    sent = time.perf_counter()
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gap = statistics.mean(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
    return stamps[0] - sent, gap


async def alternate(urls: dict[str, str], args, vocab: int) -> dict[str, tuple[float, float]]:
    """Per server: (time to first token, steady inter-token time), medians in ms."""
    rng = random.Random(args.seed)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        for i in range(args.requests + args.warmup):
            for name, url in urls.items():
                prompt = [rng.randrange(16, vocab) for _ in range(args.input_len)]
                got = await stream_times(http, url, args.model_name, prompt, args.output_len,
                                         dict(PREFILL_KV_PARAMS) if "prefill:" in name
                                         else None)
                if i >= args.warmup:
                    times[name].append(got)
    return {name: tuple(statistics.median(t[k] for t in v) * 1e3 for k in (0, 1))
            for name, v in times.items()}


def start(spec: str, core: int, args, workdir: Path):
    kind, _, delay = spec.partition(":")
    if kind not in ("plain", "nixl", "prefill") or (kind != "plain" and not delay.isdigit()):
        raise SystemExit(f"bad server {spec!r}: plain, nixl:<delay µs> or prefill:<delay µs>")
    port = listen_port()
    env = {**server_env(int(delay) if delay else None, SMALL_HOST_SHM_BUSY_LOOP_S),
           "VLLM_NIXL_SIDE_CHANNEL_PORT": str(listen_port()),
           "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    log = workdir / f"{spec.replace(':', '-')}-core{core}.log"
    kv = {"nixl": NIXL, "prefill": {**NIXL, "kv_role": "kv_producer"}}.get(kind)
    cmd = vllm_server_command(args, port, core, kv)
    return start_logged(cmd, log, ROOT, env), port, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", default="plain", help="first server (plain | nixl:<µs>)")
    parser.add_argument("--b", default="nixl:100", help="second server")
    parser.add_argument("--model-path", default="models/tiny-llama")
    parser.add_argument("--model-name", default="tiny-llama")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="per server and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "nixl_engine")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((ROOT / args.model_path / "config.json").read_text())["vocab_size"]
    for cores in ((0, 1), (1, 0)):
        placed = list(zip((args.a, args.b), cores, strict=True))
        servers = [start(spec, core, args, args.out) for spec, core in placed]
        try:
            for (proc, port, log), (_, core) in zip(servers, placed, strict=True):
                wait_ready(f"http://{HOST}:{port}", args.model_name, proc, log, 600)
                pin_plain_server(proc.pid, core)
            urls = {f"{spec}@core{core}": f"http://{HOST}:{port}"
                    for (spec, core), (_, port, _) in zip(placed, servers, strict=True)}
            for name, (ttft, gap) in asyncio.run(alternate(urls, args, vocab)).items():
                print(f"{name:>24}: time to first token p50 {ttft:.2f} ms, "
                      f"steady inter-token time p50 {gap:.2f} ms", flush=True)
        finally:
            for proc, port, _ in servers:
                stop_process_group(proc, HOST, port, grace_s=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
