"""The P/D handoff, taken apart: per-stage timeline, first token from prefill, KV bandwidth in
the request path, and KV compressed to FP8 in transit (issue 11). One run, side by side:

1. ``tiny``: the serving_overhead workload (tiny model, 200-token prompts, 32 output tokens,
   concurrency 1), disaggregated, with the per-request timeline on (``handoff.timeline``):
   ``before`` = ``handoff.first_token_from_prefill: false`` (decode samples token 1 again),
   ``after`` = ``true`` (prefill's token 1 streamed at once). Client TTFT, time to token 2,
   TPOT, and the median of every timeline stage; a stacked bar plot of both.
2. ``small``: the small model, prompts of 1000, 2000 and 3990 tokens, KV cache ``auto`` (bf16) vs
   ``fp8``: KV bytes per request from the decode engine's NIXL stats, the in-path bandwidth
   (bytes / time from prefill's token 1 to decode's request scheduled with its KV), and the
   raw NIXL READ bandwidth of ``bench/nixl_bandwidth.py`` at the 2k-prompt size between two
   processes pinned to the engines' two cores, with the same descriptor size and progress
   delay (measured after the app stops: not inside the engine processes themselves).
3. ``push``: ``handoff.transfer: push`` (the decode leg sent with the prefill leg, decode
   admitted while prefill computes, prefill WRITEs the KV): the tiny workload (``push`` row,
   token 1 from decode) and the 2k-prompt small point (``auto (push)``), with the same
   prompts as the pull points.
4. Accuracy of FP8 KV: the same 16 fixed prompts, greedy, 32 tokens, ``logprobs`` 1, on the
   bf16 and the fp8 app: greedy agreement (tokens equal up to the first divergence) and
   the mean absolute logprob drift of the agreeing tokens.

    python bench/handoff.py          # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import READER_PROGRESS_DELAY_US  # noqa: E402
from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S  # noqa: E402
from app.handoff.timeline import (  # noqa: E402
    DETAIL_STAGES,
    LOCAL_STAGES,
    STAGES,
    median_stages,
)
from app.ports import listen_port  # noqa: E402
from loadtests.envinfo import hardware, hardware_line  # noqa: E402
from loadtests.mdsection import update_file  # noqa: E402
from loadtests.servers import apply_overrides, running_app  # noqa: E402

SECTION = "bench:handoff"
DEFAULT_LENGTHS = "1000,2000,3990"  # the small points' prompt lengths
HOST = "127.0.0.1"
TIMELINE_TAG = "pd_timeline "


@dataclass
class Stream:
    ttft: float
    ttst: float | None  # time to the second token
    tpot: float | None
    tokens: int
    headers: float | None = None  # the response's headers read by the client


@dataclass
class Point:
    name: str
    streams: list[Stream] = field(default_factory=list)
    timelines: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0

    def p50(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.streams if getattr(s, attr) is not None]
        return statistics.median(values) * 1e3 if values else None


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


async def stream_one(http: httpx.AsyncClient, base: str, model: str, prompt: list[int],
                     max_tokens: int) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", base + "/v1/completions", json=body) as r:
        headers = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            got = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
            stamps += [time.perf_counter()] * got
    if not stamps:
        raise RuntimeError("no tokens streamed")
    n = len(stamps)
    return Stream(stamps[0] - t0, stamps[1] - t0 if n > 1 else None,
                  (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None, n, headers)


async def sequential(base: str, model: str, batch: list[list[int]], max_tokens: int,
                     point: Point) -> None:
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        for prompt in batch:
            try:
                point.streams.append(await stream_one(http, base, model, prompt, max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                point.errors += 1
                print(f"  {point.name}: request failed: {exc}", file=sys.stderr)


async def greedy_logprobs(base: str, model: str, batch: list[list[int]], max_tokens: int
                          ) -> list[list[tuple[int, float]]]:
    """(token id, logprob) of each greedy token, per prompt (non-streamed, logprobs 1)."""
    out = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as http:
        for prompt in batch:
            r = await http.post(base + "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "logprobs": 1, "return_token_ids": True})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out.append(list(zip(choice["token_ids"], choice["logprobs"]["token_logprobs"],
                                strict=True)))
    return out


def agreement(ref: list[list[tuple[int, float]]], other: list[list[tuple[int, float]]]
              ) -> tuple[float, float, int]:
    """(fraction of tokens equal up to each prompt's first divergence, mean |logprob drift|
    over those tokens, prompts identical throughout)."""
    agreed = total = identical = 0
    drift: list[float] = []
    for a, b in zip(ref, other, strict=True):
        total += len(a)
        run = 0
        for (ta, la), (tb, lb) in zip(a, b, strict=True):
            if ta != tb:
                break
            run += 1
            drift.append(abs(la - lb))
        agreed += run
        identical += run == len(a)
    return agreed / max(total, 1), statistics.fmean(drift) if drift else 0.0, identical


def timelines_from(log: Path, since: int) -> list[dict[str, Any]]:
    """The front's ``pd_timeline`` records logged after byte offset ``since``."""
    records = []
    with log.open("rb") as fh:
        fh.seek(since)
        for raw in fh:
            line = raw.decode(errors="replace")
            at = line.find(TIMELINE_TAG)
            if at >= 0:
                try:
                    records.append(json.loads(line[at + len(TIMELINE_TAG):]))
                except ValueError:
                    pass
    return records


def app_config(args, model: str, port: int, first_token: bool, kv_dtype: str,
               mode: str = "disaggregated") -> dict:
    engine = {"max_model_len": args.max_model_len, "block_size": 32, "enforce_eager": True,
              "kv_cache_memory_bytes": 1 << 30}
    if kv_dtype != "auto":
        engine["kv_cache_dtype"] = kv_dtype
    app_args = {
        "model": {"path": str(ROOT / "models" / model), "served_model_name": model},
        "mode": mode,
        "engine_args": engine,
        "aggregated": {"cpu_cores": ["0"]},  # the prefill engine's core: its compute compares
        "prefill": {"cpu_cores": ["0"]},
        "decode": {"cpu_cores": ["1"]},
        "nixl": {"side_channel_host": HOST, "progress_delay_us": args.nixl_delay_us,
                 "reader_progress_delay_us": args.reader_delay_us},
        "engine_process": {"shm_busy_loop_s": SMALL_HOST_SHM_BUSY_LOOP_S},
        # every request disaggregated (the KV router would prefill short prompts on
        # decode: not with local_prefill_max_tokens 0)
        "routing": ({"policy": "kv", "local_prefill_max_tokens": 0, "advertise_host": HOST}
                    if args.policy == "kv" else {"policy": "power_of_two"}),
        "handoff": {"first_token_from_prefill": first_token, "timeline": True},
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": HOST, "port": port},
        "logging_config": {"log_level": "INFO", "enable_access_log": False},
        "applications": [{"name": "pd", "route_prefix": "/",
                          "import_path": "app.builder:build_app",
                          "args": apply_overrides(app_args, args.set)}],
    }


def with_push(args, *more: str):
    """``args`` for the push points: ``handoff.transfer: push`` (and ``more`` settings) on
    top of any ``--set``."""
    return argparse.Namespace(**{**vars(args), "set": [*args.set, 'handoff.transfer="push"',
                                                      *more]})


# Early push acts when prefill runs a prompt in chunks: 2k prompts in four.
PUSH_CHUNK_TOKENS = 512


def chunked_push_args(args, early: bool):
    """The chunked push points: prefill in ``PUSH_CHUNK_TOKENS`` chunks, early push on/off."""
    return with_push(args, f"prefill.engine_args.max_num_batched_tokens={PUSH_CHUNK_TOKENS}",
                     f"handoff.push_early_blocks={'true' if early else 'false'}")


def run_point(args, name: str, model: str, first_token: bool, kv_dtype: str, work: Path,
              jobs: list[tuple[str, list[list[int]], int]], accuracy: list[list[int]] | None,
              mode: str = "disaggregated") -> tuple[dict[str, Point], list | None]:
    port = listen_port()
    config = app_config(args, model, port, first_token, kv_dtype, mode)
    points: dict[str, Point] = {}
    logprobs = None
    with running_app(config, work, name, HOST, port, model) as (base, _proc, log):
        for label, batch, max_tokens in jobs:
            asyncio.run(sequential(base, model, batch[:2], max_tokens, Point("warm-up")))
            time.sleep(1.0)
            offset = log.stat().st_size
            point = points[label] = Point(f"{name}/{label}")
            asyncio.run(sequential(base, model, batch[2:], max_tokens, point))
            time.sleep(2.0)  # log lines reach the driver's output asynchronously
            point.timelines = timelines_from(log, offset)
            print(f"   {name}/{label}: TTFT p50 {point.p50('ttft'):.1f} ms, token 2 "
                  f"{point.p50('ttst'):.1f} ms, TPOT {point.p50('tpot'):.2f} ms, "
                  f"{len(point.timelines)} timelines, errors {point.errors}",
                  file=sys.stderr, flush=True)
        if accuracy:
            logprobs = asyncio.run(greedy_logprobs(base, model, accuracy, 32))
    return points, logprobs


# The raw READ's descriptor size: the app's own. vLLM-CPU keeps one layer's K and V of a
# block together, so a 2k prompt moves as 630 descriptors of 32 KiB (a trace of the push
# worker's make_prepped_xfer); 16 KiB ones (used before 2026-12-06 23:30) double the count
# and lower the raw figure the in-path target is measured against.
RAW_CHUNK_KIB = 32


def raw_nixl(size_mib: float, chunk_kib: int, delay_us: int) -> dict[str, Any] | None:
    """bench/nixl_bandwidth.py between two processes on the engines' cores (0 and 1)."""
    cmd = ["taskset", "-c", "0-1", sys.executable, str(ROOT / "bench" / "nixl_bandwidth.py"),
           "--sizes", f"{size_mib:g}", "--chunk-kib", str(chunk_kib), "--iters", "30",
           "--progress-delay-us", str(delay_us), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    print(f"nixl_bandwidth failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


# --- report ----------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def plot(tiny: dict[str, Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*LOCAL_STAGES, *STAGES]  # a one-engine row has the first three and to_socket
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for row, point in enumerate(tiny.values()):
        med = median_stages(point.timelines)
        if med.get("decode_admission", 0.0) < 0 and "in_path_ms" in med:
            # push: decode was admitted during prefill; from prefill's token 1 to decode
            # scheduled is all waiting for the KV
            med.update(prefill_reply=0.0, decode_admission=0.0, kv_wait=med["in_path_ms"])
        left = 0.0
        for i, stage in enumerate(names):
            width = med.get(stage, 0.0)
            ax.barh(row, width, left=left, color=plt.cm.tab20(i), edgecolor="white",
                    label=stage if row == 0 else None)
            left += width
        front = med.get("first_chunk_ms")
        if front is not None:
            ax.plot([front], [row], marker="D", color="white", markeredgecolor="black",
                    markersize=7, label="token 1 leaves the front" if row == 0 else None)
        ttft = point.p50("ttft")
        if ttft is not None:
            ax.plot([ttft], [row], marker="v", color="black", markersize=9,
                    label="client TTFT p50" if row == 0 else None)
    ax.set_yticks(range(len(tiny)), [f"{k}" for k in tiny])
    ax.set_xlabel("ms from the front receiving the request to decode's first token (medians)")
    ax.set_title("Tiny model, 200-token prompt, concurrency 1: one engine vs P/D")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def path_figures(small: dict[str, dict[str, Point]], dtype: str, label: str
                 ) -> tuple[float | None, float | None, float | None]:
    """(KV bytes per request, in-path GB/s (inf for a median in-path of 0), in-path ms),
    medians. A push is WRITTEN by the prefill engine, so decode's READ counter is empty: its
    bytes are those the pull point read for the same prompts (same blocks, same layout)."""
    med = median_stages(small[dtype][label].timelines)
    span = med.get("in_path_ms")
    kv = med.get("kv_bytes")
    if kv is None and "push" in dtype:
        pulled = small.get(dtype.split(" ")[0], {}).get(label)
        kv = median_stages(pulled.timelines).get("kv_bytes") if pulled else None
    # a median in-path of 0: the median request's KV was at decode before prefill's token 1
    gbps = (kv / (span * 1e6) if span else float("inf")) if kv and span is not None else None
    return kv, gbps, span


def fp8_kv_runs_here() -> bool:
    """vLLM-CPU's FP8 KV cache needs AVX-512 or AMX on x86 (its CPU attention backend refuses
    to start without them: the engine fails at KV-cache set-up)."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # vLLM's rule is for x86 only
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


# (one engine's stage, the P/D request's stage) of the path to token 1, side by side
TOKEN_ONE_PATH = (("to engine", "local_to_engine", "to_prefill_engine"),
                  ("queue", "local_queue", "prefill_queue"),
                  ("compute", "local_compute", "prefill_compute"))


def one_engine_vs_prefill(tiny: dict[str, Point]) -> list[str]:
    """The aggregated app's path to token 1 next to the P/D request's prefill: the same
    marks (front receipt, engine-core queued/scheduled/first token, first chunk written) on
    the same core, so a compute or hop difference shows as such."""
    if "aggregated" not in tiny:
        return []
    lines = ["", "Path to token 1, one engine (`aggregated`, `mode: aggregated` on core 0) vs "
             "prefill's engine (core 0): medians, ms; `after token 1` = first chunk written "
             "minus the three before it (for `before` it holds the whole handoff).", "",
             "| setup | " + " | ".join(n for n, _, _ in TOKEN_ONE_PATH)
             + " | after token 1 | first chunk | client headers p50 | TTFT p50 |",
             "|---|---|---|---|---|---|---|---|"]
    computes = {}
    for label, point in tiny.items():
        med = median_stages(point.timelines)
        col = 1 if label == "aggregated" else 2
        parts = [med.get(names[col]) for names in TOKEN_ONE_PATH]
        first = med.get("first_chunk_ms")
        rest = (first - sum(parts)) if first is not None and None not in parts else None
        computes[label] = parts[2]
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in parts)
                     + f" | {fmt(rest)} | {fmt(first)} | {fmt(point.p50('headers'))} | "
                     f"{fmt(point.p50('ttft'))} |")
    one, pre = computes.get("aggregated"), computes.get("after")
    if one is not None and pre is not None:
        lines += ["", f"Prefill's compute (`after`) minus one engine's: **{pre - one:+.1f} ms** "
                  f"({fmt(pre)} vs {fmt(one)} ms)."]
    return lines


def markdown(args, command: str, tiny: dict[str, Point], small: dict[str, dict[str, Point]],
             raw: dict | None, acc: tuple[float, float, int] | None, n_acc: int) -> str:
    hw = hardware()
    lines = [
        "## KV handoff: timeline, first token from prefill, push, FP8 KV (issue 11)",
        "",
        f"Generated by `bench/handoff.py` on {datetime.now():%Y-%m-%d %H:%M} "
        f"(commit `{hw.get('git_commit') or '?'}`).",
        "",
        f"- Command: `{command}`",
        f"- Hardware: {hardware_line(hw)}",
        f"- Disaggregated app (`routing.policy: {args.policy}`: every request takes the P/D "
        "path), "
        "prefill engine on core 0, decode on core 1, block size 32, "
        f"NIXL progress delay {args.nixl_delay_us} µs ({args.reader_delay_us} µs on decode "
        "under pull), `handoff.timeline: true`; sequential "
        "streaming completions of random token ids, greedy, `ignore_eos`.",
        "- Timeline stages (medians, ms) from the front's per-request `pd_timeline` log lines: "
        "front marks plus vLLM's engine-core request timestamps (one host, one monotonic "
        "clock). `first chunk` is the client's TTFT as the front sees it; `decode token` is "
        "decode's first token reaching the front.",
        "",
        "### Tiny model, 200-token prompts, 32 tokens (the serving_overhead workload)",
        "",
        "| setup | TTFT p50 | token 2 p50 | TPOT p50 | " + " | ".join(STAGES)
        + " | first chunk | decode token | ok |",
        "|---|" + "---|" * (len(STAGES) + 6),
    ]
    for label, point in tiny.items():
        med = median_stages(point.timelines)
        lines.append(
            f"| {label} | {fmt(point.p50('ttft'))} | {fmt(point.p50('ttst'))} | "
            f"{fmt(point.p50('tpot'), 2)} | "
            + " | ".join(fmt(med.get(s)) for s in STAGES)
            + f" | {fmt(med.get('first_chunk_ms'))} | {fmt(med.get('decode_first_chunk_ms'))}"
            f" | {len(point.streams)} |")
    if "push" in tiny:
        lines += ["", "`push`: decode is admitted while prefill computes, so `decode_admission` "
                  "is negative and `kv_wait` starts before prefill's token 1; the handoff on "
                  "the path is prefill's token 1 → decode scheduled: "
                  f"{fmt(median_stages(tiny['push'].timelines).get('in_path_ms'))} ms vs "
                  f"{fmt(median_stages(tiny['before'].timelines).get('in_path_ms'))} ms "
                  "with pull (`before`: token 1 from decode too)."]
    lines += one_engine_vs_prefill(tiny)
    lines += ["", "In detail (the KV router's marks, with `--policy kv`; the prefill replica's "
              "own marks: Ray hop vs vLLM frontend):", "",
              "| setup | " + " | ".join(DETAIL_STAGES) + " |",
              "|---|" + "---|" * len(DETAIL_STAGES)]
    for label, point in tiny.items():
        med = median_stages(point.timelines)
        lines.append(f"| {label} | " + " | ".join(fmt(med.get(s)) for s in DETAIL_STAGES)
                     + " |")
    lines += ["", "![handoff timeline](img/handoff_timeline.png)", "",
              "### Small model: KV bytes and bandwidth in the request path, bf16 vs FP8 KV",
              "",
              "| KV cache | prompt tokens | KV bytes / request | NIXL READ ms | in-path ms "
              "| in-path GB/s | TTFT p50 | TPOT p50 | ok |",
              "|---|---|---|---|---|---|---|---|---|"]
    for dtype, points in small.items():
        for label, point in points.items():
            med = median_stages(point.timelines)
            kv, gbps, span = path_figures(small, dtype, label)
            lines.append(
                f"| {dtype} | {label} | {fmt(kv / 1e6 if kv else None, 2)} MB | "
                f"{fmt(med.get('kv_read_ms'), 2)} | {fmt(span, 2)} | {fmt(gbps, 2)} | "
                f"{fmt(point.p50('ttft'))} | {fmt(point.p50('tpot'), 2)} | "
                f"{len(point.streams)} |")
    lines += [""]
    checks = []
    if raw is not None:
        lines.append(f"Raw NIXL READ, two processes on cores 0-1, {raw['mib']:g} MiB in "
                     f"{raw['chunk_kib']} KiB descriptors: **{raw['gbps']:.2f} GB/s** "
                     f"(p50 {raw['p50_us']:.0f} µs).")
        for dtype, how in (("auto", "pull"), ("auto (push)", "push"),
                           (f"auto (push, {PUSH_CHUNK_TOKENS}-token chunks, early)",
                            "push, early")):
            gbps = path_figures(small, dtype, "2000")[1] if dtype in small else None
            if gbps is not None:
                checks.append((f"in-path KV bandwidth ≥ 0.7 × raw NIXL READ (small model, 2k "
                               f"prompts, {how})", f"{gbps:.2f} vs 0.7 × {raw['gbps']:.2f} = "
                               f"{0.7 * raw['gbps']:.2f} GB/s", gbps >= 0.7 * raw["gbps"]))
    bf16 = small.get("auto", {}).get("2000")
    fp8 = small.get("fp8", {}).get("2000")
    if bf16 and fp8:
        b = median_stages(bf16.timelines).get("kv_bytes")
        f = median_stages(fp8.timelines).get("kv_bytes")
        if b and f:
            checks.append(("FP8 KV moves ≥ 1.8 × fewer bytes (2k prompts)",
                           f"{b / 1e6:.2f} MB vs {f / 1e6:.2f} MB = {b / f:.2f} ×",
                           b / f >= 1.8))
    if not args.skip_small and "fp8" not in small:
        lines.append("FP8 KV not measured: vLLM-CPU needs AVX-512 or AMX for an FP8 KV cache, "
                     "and this CPU has neither.")
    if acc is not None:
        lines.append(f"FP8 KV vs bf16 KV, {n_acc} fixed 512-token prompts, greedy, 32 tokens: "
                     f"**{acc[0] * 100:.1f} %** of tokens agree up to each prompt's first "
                     f"divergence, {acc[2]} of {n_acc} outputs identical; mean |logprob "
                     f"drift| of agreeing tokens **{acc[1]:.4f}** nats.")
    before, after = tiny.get("before"), tiny.get("after")
    if before and after:
        checks.append(("first token from prefill lowers TTFT p50",
                       f"{fmt(after.p50('ttft'))} vs {fmt(before.p50('ttft'))} ms",
                       (after.p50("ttft") or 1e9) < (before.p50("ttft") or 0)))
    lines += ["", "Checks (within this run):", ""]
    lines += [f"- {'✅' if ok else '❌'} {name}: {detail}" for name, detail, ok in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="per tiny point")
    parser.add_argument("--small-requests", type=int, default=6, help="per small point")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--nixl-delay-us", type=int, default=100)
    parser.add_argument("--reader-delay-us", type=int, default=READER_PROGRESS_DELAY_US,
                        help="nixl.reader_progress_delay_us (decode engines under pull)")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--small-lengths", default=DEFAULT_LENGTHS,
                        help="prompt lengths of the small points (the in-path check is at "
                             "2000; a run without all three writes no docs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="override an app setting (experiments), e.g. "
                        "--set handoff.prefill_plane=false")
    parser.add_argument("--no-push", action="store_true",
                        help="skip the handoff.transfer=push points")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "handoff")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--policy", choices=["power_of_two", "kv"], default="power_of_two",
                        help="kv: the same always-remote path behind the KV-aware router "
                             "(its stages router, router_to_front in the detail table)")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw_argv)
    command = shlex.join(["python", "bench/handoff.py", *raw_argv])

    def vocab(model: str) -> int:
        return json.loads((ROOT / "models" / model / "config.json").read_text())["vocab_size"]

    tiny: dict[str, Point] = {}
    # the aggregated app first: the same prompts on one engine, the baseline of the handoff
    for label, first_token, mode in (("aggregated", True, "aggregated"),
                                     ("before", False, "disaggregated"),
                                     ("after", True, "disaggregated")):
        batch = prompts(args.requests + 2, 200, vocab("tiny-llama"), seed=11)
        points, _ = run_point(args, f"tiny-{label}", "tiny-llama", first_token, "auto",
                              args.out, [("200", batch, 32)], None, mode)
        tiny[label] = points["200"]
    push_args = with_push(args)
    if not args.no_push:
        batch = prompts(args.requests + 2, 200, vocab("tiny-llama"), seed=11)
        tiny["push"] = run_point(push_args, "tiny-push", "tiny-llama", False, "auto",
                                 args.out, [("200", batch, 32)], None)[0]["200"]
    small: dict[str, dict[str, Point]] = {}
    acc = raw = None
    lengths = [int(n) for n in args.small_lengths.split(",") if n.strip()]
    fp8_here = fp8_kv_runs_here()
    if not args.skip_small and not fp8_here:
        print("FP8 KV skipped: vLLM-CPU needs AVX-512 or AMX for it, this CPU has neither",
              file=sys.stderr)
    n_acc = 16
    if not args.skip_small:
        v = vocab("small-llama")
        jobs = [(str(n), prompts(args.small_requests + 2, n, v, seed=n), 16)
                for n in lengths]
        two_k_jobs = [job for job in jobs if job[0] == "2000"]
        fixed = prompts(n_acc, 512, v, seed=7)
        lp: dict[str, list] = {}
        for dtype in ("auto", "fp8") if fp8_here else ("auto",):
            small[dtype], lp[dtype] = run_point(args, f"small-{dtype}", "small-llama", True,
                                                dtype, args.out, jobs,
                                                fixed if fp8_here else None)
        if not args.no_push and two_k_jobs:  # the same 2k prompts, moved by push
            small["auto (push)"] = run_point(push_args, "small-push", "small-llama", False,
                                             "auto", args.out, two_k_jobs, None)[0]
            for early in (False, True):  # prefill in chunks: early push off / on
                label = f"auto (push, {PUSH_CHUNK_TOKENS}-token chunks{', early' if early else ''})"
                small[label] = run_point(chunked_push_args(args, early),
                                         f"small-push-chunked{'-early' if early else ''}",
                                         "small-llama", False, "auto", args.out,
                                         two_k_jobs, None)[0]
        acc = agreement(lp["auto"], lp["fp8"]) if fp8_here else None
        two_k_point = small["auto"].get("2000")
        two_k = median_stages(two_k_point.timelines).get("kv_bytes") if two_k_point else None
        size = (two_k or 2000 * 10240) / (1 << 20)
        raw = raw_nixl(size, RAW_CHUNK_KIB, args.nixl_delay_us)
    write_docs = (not args.no_docs and not args.skip_small
                  and args.small_lengths == DEFAULT_LENGTHS)
    # the docs' figure only with the docs' section, so a partial run cannot replace it
    plot(tiny, (ROOT / "docs" / "img" if write_docs else args.out) / "handoff_timeline.png")
    text = markdown(args, command, tiny, small, raw, acc, n_acc)
    print(text)
    (args.out / "results.json").write_text(json.dumps({
        "tiny": {k: {"streams": [s.__dict__ for s in p.streams], "timelines": p.timelines}
                 for k, p in tiny.items()},
        "small": {d: {k: {"streams": [s.__dict__ for s in p.streams],
                          "timelines": p.timelines} for k, p in pts.items()}
                  for d, pts in small.items()},
        "raw_nixl": raw, "accuracy": acc}, indent=1))
    if write_docs:
        update_file(args.docs, SECTION, text)
        print(f"wrote section {SECTION} of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
