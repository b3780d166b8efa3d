"""Run a benchmark end to end: resolve model and token ids, warm up, run each load point
with a progress bar, summarise, and write results, reports and plots.

Each load point of a sweep gets its own seed (``SEED.i``), so no point's prompts are already
in the server's prefix cache from an earlier point; the same base seed gives the same
traffic against any server, which is what makes two deployments comparable.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from loadtests import __version__
from loadtests.arrivals import arrival_offsets
from loadtests.client import CompletionsClient, PromptFormat
from loadtests.envinfo import hardware, hardware_line
from loadtests.metrics import (
    DEFAULT_PERCENTILES,
    SLO,
    RequestRecord,
    distserve_goodput,
    summarize,
)
from loadtests.priority import ClientPriority, client_priority
from loadtests.prompts import TokenSpace
from loadtests.report import (
    load_label,
    run_result,
    write_run_outputs,
    write_sweep_outputs,
)
from loadtests.runner import run_load
from loadtests.spec import ArrivalSpec, AzureSpec, MooncakeSpec, SyntheticSpec
from loadtests.traces import resolve_traces_dir
from loadtests.workloads import Request, build_requests, workload_stats

WARMUP_MAX_TOKENS = 8


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI and the scenario scripts both build one."""

    target: str
    workload: SyntheticSpec | AzureSpec | MooncakeSpec
    out: Path
    model: str | None = None
    arrival: ArrivalSpec | None = None  # default: trace for trace workloads, else poisson
    rates: list[float] | None = None
    concurrencies: list[int] | None = None
    max_concurrency: int | None = None
    slo: SLO = field(default_factory=SLO)
    attainment_target: float = 0.9
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    seed: int = 0
    warmup: int = 1
    prompt_format: PromptFormat = "ids"
    token_range: TokenSpace | None = None
    vocab_size: int | None = None
    tokenizer_dir: Path | None = None
    traces_dir: Path | None = None
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout: float = 600.0
    api_key: str | None = None
    cache_block: int = 16
    label: str | None = None
    command: str = ""
    progress: bool = True
    plots: bool = True
    client_priority: ClientPriority = "normal"  # loadtests.priority: realtime on a shared box

    def resolved_arrival(self) -> ArrivalSpec:
        if self.arrival is not None:
            return self.arrival
        kind = "poisson" if isinstance(self.workload, SyntheticSpec) else "trace"
        return ArrivalSpec(kind=kind)


def load_points(cfg: BenchConfig) -> tuple[str, list[float | None]]:
    """(``rate`` | ``concurrency``, the values to run): one value is a run, more a sweep."""
    arrival = cfg.resolved_arrival()
    if arrival.kind == "closed":
        if cfg.rates:
            raise ValueError("closed-loop arrivals take --concurrency, not --rate")
        concurrencies = cfg.concurrencies or (
            [arrival.concurrency] if arrival.concurrency else None
        )
        if not concurrencies:
            raise ValueError("closed-loop arrivals need --concurrency N[,N...]")
        return "concurrency", [float(c) for c in concurrencies]
    if cfg.concurrencies:
        raise ValueError("--concurrency is for closed loop; use --max-concurrency to cap")
    if arrival.kind == "trace":
        if isinstance(cfg.workload, SyntheticSpec):
            raise ValueError("trace arrivals need a trace workload (azure or mooncake)")
        return "rate", list(cfg.rates) if cfg.rates else [None]
    if not cfg.rates:
        raise ValueError(f"{arrival.kind} arrivals need --rate R[,R...]")
    return "rate", list(cfg.rates)


def vocab_from_dir(path: Path) -> int | None:
    """``vocab_size`` from a model directory's ``config.json`` (no tokenizer import)."""
    config = path / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("vocab_size")
        if isinstance(value, int):
            return value
    return None


async def resolve_token_space(
    cfg: BenchConfig, client: CompletionsClient
) -> tuple[TokenSpace, str]:
    """Token ids to draw from, and where the bound came from."""
    if cfg.token_range is not None:
        return cfg.token_range, "--token-range"
    if cfg.vocab_size:
        return TokenSpace.for_vocab(cfg.vocab_size), f"--vocab-size {cfg.vocab_size}"
    if cfg.tokenizer_dir is not None:
        vocab = vocab_from_dir(cfg.tokenizer_dir)
        if vocab:
            return TokenSpace.for_vocab(vocab), f"{cfg.tokenizer_dir}/config.json ({vocab})"
    vocab = await client.probe_vocab_size()
    return TokenSpace.for_vocab(vocab), f"probed vocabulary size {vocab}"


async def _to_text(client: CompletionsClient, requests: list[Request], space: TokenSpace,
                   seed: str) -> None:
    slots = asyncio.Semaphore(8)

    async def one(request: Request) -> None:
        async with slots:
            await client.to_text(request, space, seed)

    await asyncio.gather(*(one(r) for r in requests))


async def _warmup(client: CompletionsClient, requests: list[Request], console: Console) -> None:
    """Send a few short requests one by one; fail fast if none succeeds (misconfiguration)."""
    t0 = time.perf_counter()
    records = []
    for request in requests:
        record = RequestRecord(request.request_id, request.prompt_len, request.output_len)
        await client.stream(request, record, lambda: time.perf_counter() - t0,
                            max_tokens=min(request.output_len, WARMUP_MAX_TOKENS))
        records.append(record)
    ok = sum(r.success for r in records)
    console.print(f"warm-up: {ok}/{len(records)} requests succeeded")
    if records and not ok:
        raise RuntimeError(f"every warm-up request failed; first error: {records[0].error}")


def _progress(enabled: bool, console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok [green]{task.fields[ok]}[/] failed [red]{task.fields[failed]}[/]"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _offered_rate(offsets: list[float] | None) -> float | None:
    if not offsets or len(offsets) < 2 or offsets[-1] <= 0:
        return math.inf if offsets else None
    return (len(offsets) - 1) / offsets[-1]


async def run_benchmark(
    cfg: BenchConfig,
    console: Console | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Run every load point of ``cfg``; returns the run result (one point) or the sweep.

    ``transport`` replaces the network (tests use ``httpx.MockTransport``)."""
    with client_priority(cfg.client_priority):
        return await _run_points(cfg, console or Console(stderr=True), transport)


async def _run_points(
    cfg: BenchConfig, console: Console, transport: httpx.AsyncBaseTransport | None
) -> dict[str, Any]:
    arrival = cfg.resolved_arrival()
    load_kind, loads = load_points(cfg)
    traces_dir = resolve_traces_dir(cfg.traces_dir)
    hw = hardware()
    single = len(loads) == 1
    async with CompletionsClient(
        cfg.target, cfg.model, api_key=cfg.api_key, timeout=cfg.request_timeout,
        prompt_format=cfg.prompt_format, ignore_eos=cfg.ignore_eos, extra_body=cfg.extra_body,
        transport=transport,
    ) as client:
        model = await client.resolve_model()
        space, space_source = await resolve_token_space(cfg, client)
        console.print(f"model [bold]{model}[/] at {cfg.target}; prompt token ids "
                      f"{space.lo}:{space.hi} ({space_source})")

        async def build(seed: str, limit: int | None = None) -> list[Request]:
            requests = build_requests(cfg.workload, space, seed, traces_dir)[:limit]
            if cfg.prompt_format == "text":
                await _to_text(client, requests, space, seed)
            return requests

        if cfg.warmup:
            await _warmup(client, await build(f"{cfg.seed}.warmup", cfg.warmup), console)

        points: list[dict[str, Any]] = []
        point_rows: dict[str, list[dict[str, Any]]] = {}
        for i, load in enumerate(loads):
            seed = f"{cfg.seed}.{i}"
            requests = await build(seed)
            if not requests:
                raise ValueError("the workload is empty (check slice= and n=)")
            rate = load if load_kind == "rate" else None
            offsets = arrival_offsets(arrival, len(requests), rate,
                                      [r.timestamp for r in requests], seed)
            concurrency = int(load) if load_kind == "concurrency" and load else None
            shown = load if load is not None else _offered_rate(offsets)
            with _progress(cfg.progress, console) as progress:
                task = progress.add_task(
                    f"{load_kind} {shown:.4g}" if shown is not None else "trace",
                    total=len(requests), ok=0, failed=0)
                counts = {"ok": 0, "failed": 0}

                def done(record: RequestRecord, task: Any = task,
                         counts: dict[str, int] = counts, progress: Progress = progress) -> None:
                    counts["ok" if record.success else "failed"] += 1
                    progress.update(task, advance=1, **counts)

                outcome = await run_load(client, requests, offsets, concurrency=concurrency,
                                         max_concurrency=cfg.max_concurrency, on_done=done)
            summary = summarize(outcome.records, outcome.duration, cfg.slo, cfg.percentiles)
            point_load = shown if load_kind == "rate" else load
            meta = _meta(cfg, model, arrival, load_kind, point_load, seed, space, space_source,
                         hw, workload_stats(requests, cfg.cache_block), concurrency)
            result = run_result(summary, outcome.records, meta)
            subdir = load_label(load_kind, load)
            out = cfg.out if single else cfg.out / subdir
            write_run_outputs(out, result, plots=cfg.plots)
            console.print(_point_line(load_kind, point_load, summary))
            point = {k: v for k, v in result.items() if k not in _PER_REQUEST_KEYS}
            point["dir"] = "." if single else subdir
            points.append(point)
            point_rows[point["dir"]] = result["requests"]
        if single:
            console.print(f"results in {cfg.out}/")
            return result
        sweep = {k: v for k, v in points[0].items() if k in ("label", "model_id", "date",
                                                             "backend", "max_concurrency")}
        sweep["loadtests"] = dict(points[0]["loadtests"], seed=cfg.seed)
        sweep.update(kind="sweep", load_kind=load_kind, slo=points[0]["slo"], points=points)
        if cfg.slo.is_set:
            goodput = distserve_goodput(
                [(p["load"], p["slo_attainment"]) for p in points], cfg.attainment_target)
            sweep["goodput_distserve"] = {
                "goodput": goodput.goodput, "interpolated": goodput.interpolated,
                "status": goodput.status, "target": goodput.target, "load_kind": load_kind,
            }
        write_sweep_outputs(cfg.out, sweep, point_rows, plots=cfg.plots)
        console.print(f"results in {cfg.out}/ (one subdirectory per {load_kind})")
        return sweep


_PER_REQUEST_KEYS = {"input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
                     "errors", "requests"}


def _meta(cfg: BenchConfig, model: str, arrival: ArrivalSpec, load_kind: str,
          load: float | None, seed: str, space: TokenSpace, space_source: str,
          hw: dict[str, Any], stats: dict[str, Any], concurrency: int | None) -> dict[str, Any]:
    rate = load if load_kind == "rate" else None
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "endpoint_type": "openai",
        "label": cfg.label,
        "model_id": model,
        "tokenizer_id": None,
        "num_prompts": stats["num_requests"],
        "request_rate": "inf" if rate is None or math.isinf(rate) else rate,
        "burstiness": arrival.shape,
        "max_concurrency": concurrency or cfg.max_concurrency,
        "load": load,
        "loadtests": {
            "version": __version__,
            "target": cfg.target,
            "workload": cfg.workload.compact(),
            "arrival": arrival.compact()
            + (f" at {load:.4g} req/s" if rate is not None else "")
            + (" (mean)" if arrival.kind == "trace" and rate is not None else "")
            + (f" at concurrency {concurrency}" if concurrency else ""),
            "load_kind": load_kind,
            "seed": seed,
            "prompt_format": cfg.prompt_format,
            "token_range": f"{space.lo}:{space.hi}",
            "token_range_source": space_source,
            "ignore_eos": cfg.ignore_eos,
            "warmup": cfg.warmup,
            "client_priority": cfg.client_priority,
            "slo_text": cfg.slo.describe(),
            "attainment_target": cfg.attainment_target,
            "percentiles": list(cfg.percentiles),
            "command": cfg.command,
            "hardware": hw,
            "hardware_text": hardware_line(hw),
            "workload_stats": stats,
        },
    }


def _point_line(load_kind: str, load: float | None, s: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        value = s.get(key)
        return "-" if value is None else f"{value:.1f}"

    att = s.get("slo_attainment")
    where = f"{load_kind} {load:.4g}" if load is not None else "trace"
    return (
        f"{where}: {s['completed']}/{s['num_requests']} ok, [red]{s['failed']} failed[/], "
        f"{s['request_throughput']:.2f} req/s; TTFT p50/p99 {ms('p50_ttft_ms')}/"
        f"{ms('p99_ttft_ms')} ms; TPOT p50/p99 {ms('p50_tpot_ms')}/{ms('p99_tpot_ms')} ms"
        + (f"; SLO attainment {att:.1%}" if att is not None else "")
        + (f"; [yellow]client late on {s['late_sends']} sends (up to "
           f"{s['max_send_lag_ms']:.0f} ms): the load generator fell behind[/]"
           if s.get("late_sends") else "")
    )
