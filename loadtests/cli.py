"""Command line: ``run``, ``compare``, ``describe`` and ``traces fetch`` (see
``loadtests/README.md``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from rich.console import Console

from loadtests.metrics import SLO
from loadtests.priority import PRIORITIES
from loadtests.prompts import TokenSpace
from loadtests.spec import parse_arrival, parse_ints, parse_rates, parse_workload

WORKLOAD_HELP = (
    "synthetic:n=100,input=1000,output=64[,prefixes=4,prefix_len=512,suffix_len=128] | "
    "azure:conv|code[,slice=0:200,input_scale=..,output_scale=..,max_input=..,max_output=..,"
    "time_scale=..] | mooncake:block=16[,slice=0:100,max_input=..,max_output=..,"
    "output_scale=..,time_scale=..] | a .yaml/.json file with the same keys. Lengths: N, "
    "uniform:LO:HI, normal:MEAN:STD"
)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    p.add_argument("--traces-dir", type=Path, default=None,
                   help="directory with the trace files (default: $LOADTESTS_TRACES_DIR, else "
                        "../shared/traces beside the repository, else the `traces fetch` cache)")
    p.add_argument("--token-range", type=TokenSpace.parse, default=None, metavar="LO:HI",
                   help="draw prompt token ids from [LO, HI) (default: from the vocabulary)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: --tokenizer's config.json, else probed "
                        "from the server)")
    p.add_argument("--cache-block", type=int, default=16,
                   help="block size for the workload's ideal prefix-cache hit rate (report)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a load test or a sweep against an endpoint")
    run.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", default=None, help="model name (default: the server's first)")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    _add_workload_args(run)
    run.add_argument("--arrival", type=parse_arrival, default=None,
                     help="poisson | gamma:cv=X | gamma:burstiness=K | trace | "
                          "closed[:concurrency=N] (default: trace for traces, else poisson)")
    run.add_argument("--rate", type=parse_rates, default=None, metavar="R[,R...]",
                     help="offered request rate(s) in req/s; several = a sweep. With trace "
                          "arrivals, rescales the trace to this mean rate")
    run.add_argument("--concurrency", type=parse_ints, default=None, metavar="N[,N...]",
                     help="closed-loop concurrency(ies); several = a sweep")
    run.add_argument("--max-concurrency", type=int, default=None,
                     help="cap on requests in flight for open-loop arrivals")
    run.add_argument("--slo", type=SLO.parse, default=SLO(), metavar="ttft=MS,tpot=MS",
                     help="latency objectives for attainment and goodput (also e2el=MS)")
    run.add_argument("--attainment-target", type=float, default=0.9,
                     help="share of requests that must meet the SLO for DistServe goodput")
    run.add_argument("--percentiles", type=parse_rates, default=[50.0, 90.0, 99.0],
                     metavar="P[,P...]")
    run.add_argument("--warmup", type=int, default=1,
                     help="short warm-up requests before measuring (not counted)")
    run.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                     help="send token ids (exact lengths, default) or text via the server's "
                          "/detokenize and /tokenize")
    run.add_argument("--tokenizer", type=Path, default=None, dest="tokenizer_dir",
                     help="local model directory whose config.json gives the vocabulary size")
    run.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="do not send ignore_eos (servers that reject it)")
    run.add_argument("--extra-body", type=json.loads, default={},
                     help="JSON merged into every request body")
    run.add_argument("--request-timeout", type=float, default=600.0)
    run.add_argument("--api-key", default=None)
    run.add_argument("--label", default=None, help="name of this setup in reports")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    run.add_argument("--no-plots", dest="plots", action="store_false")
    run.add_argument("--client-priority", choices=PRIORITIES, default="normal",
                     help="realtime: the client's event loop on SCHED_FIFO (root), so a server "
                          "on the same busy machine cannot starve the measurement")

    cmp = sub.add_parser("compare", help="compare result directories side by side")
    cmp.add_argument("dirs", nargs="+", type=Path)
    cmp.add_argument("--labels", default=None, help="comma-separated names, one per directory")
    cmp.add_argument("--out", type=Path, default=None,
                     help="where compare.md and plots go (default: compare/ beside the dirs)")
    cmp.add_argument("--no-plots", dest="plots", action="store_false",
                     help="only print the table")
    cmp.add_argument("--cdf-load", type=float, default=None,
                     help="load point for the CDF plot (default: highest common)")

    desc = sub.add_parser("describe", help="build a workload offline and print its statistics")
    _add_workload_args(desc)
    _add_traces_args(sub)
    return parser


def _add_traces_args(sub: argparse._SubParsersAction) -> None:
    from loadtests.trace_fetch import MIRROR_ENV, SOURCES
    from loadtests.traces import CACHE_ENV

    traces = sub.add_parser("traces", help="manage the public trace files")
    tsub = traces.add_subparsers(dest="traces_command", required=True)
    fetch = tsub.add_parser(
        "fetch", help="download the Azure 2023 and Mooncake traces, SHA-256 verified",
        description="Download the public traces into a cache dir and verify their pinned "
                    "SHA-256 (those of the ../shared/traces copies). Files already present "
                    "with the right checksum are not downloaded again.")
    fetch.add_argument("keys", nargs="*", metavar="TRACE",
                       help=f"which traces: {', '.join(SOURCES)} (default: all)")
    fetch.add_argument("--dir", type=Path, default=None, dest="dest",
                       help=f"destination (default: ${CACHE_ENV}, else "
                            "~/.cache/pd-serve/traces)")
    fetch.add_argument("--from", default=None, dest="mirror", metavar="URL_OR_DIR",
                       help="fetch <URL_OR_DIR>/<file name> instead of the published URLs "
                            f"(default: ${MIRROR_ENV})")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per connection")


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    args.raw_argv = raw
    console = Console(stderr=True)
    try:
        if args.command == "run":
            return _run(args, console)
        if args.command == "compare":
            from loadtests.compare import run_compare

            labels = args.labels.split(",") if args.labels else None
            out = args.out or default_compare_dir(args.dirs)
            run_compare(args.dirs, labels, out if args.plots else None, args.cdf_load, Console())
            return 0
        if args.command == "traces":
            return _traces_fetch(args)
        return _describe(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc} (is --target up?)")
        return 2


def default_compare_dir(dirs: Sequence[Path]) -> Path:
    """``compare/`` in the deepest directory holding all of ``dirs``."""
    return Path(os.path.commonpath([d.resolve().parent for d in dirs])) / "compare"


def _run(args: argparse.Namespace, console: Console) -> int:
    from loadtests.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(
        target=args.target,
        workload=parse_workload(args.workload),
        out=args.out,
        model=args.model,
        arrival=args.arrival,
        rates=args.rate,
        concurrencies=args.concurrency,
        max_concurrency=args.max_concurrency,
        slo=args.slo,
        attainment_target=args.attainment_target,
        percentiles=tuple(args.percentiles),
        seed=args.seed,
        warmup=args.warmup,
        prompt_format=args.prompt_format,
        token_range=args.token_range,
        vocab_size=args.vocab_size,
        tokenizer_dir=args.tokenizer_dir,
        traces_dir=args.traces_dir,
        ignore_eos=args.ignore_eos,
        extra_body=args.extra_body,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        cache_block=args.cache_block,
        label=args.label,
        command=shlex.join(["python", "-m", "loadtests", *args.raw_argv]),
        progress=args.progress,
        plots=args.plots,
        client_priority=args.client_priority,
    )
    result = asyncio.run(run_benchmark(cfg, console))
    points = result.get("points", [result])
    if points and all(p["completed"] == 0 for p in points):
        console.print("[red]every request failed[/]")
        return 1
    return 0


def _describe(args: argparse.Namespace) -> int:
    from loadtests.traces import resolve_traces_dir
    from loadtests.workloads import build_requests, workload_stats

    spec = parse_workload(args.workload)
    space = args.token_range or TokenSpace.for_vocab(args.vocab_size or 32000)
    requests = build_requests(spec, space, f"{args.seed}.0", resolve_traces_dir(args.traces_dir))
    stats = workload_stats(requests, args.cache_block)
    print(json.dumps({"workload": spec.compact(), "token_range": f"{space.lo}:{space.hi}",
                      **stats}, indent=1))
    return 0


def _traces_fetch(args: argparse.Namespace) -> int:
    from loadtests.trace_fetch import SOURCES, fetch_traces
    from loadtests.traces import default_cache_dir, resolve_traces_dir

    dest = args.dest or default_cache_dir()
    statuses = fetch_traces(dest, args.keys, args.mirror, args.timeout)
    for name, status in statuses.items():
        print(f"{status:10} {dest / name}")
    for src in {s.license: s for s in SOURCES.values() if s.name in statuses}.values():
        print(f"licence: {src.license}; cite {src.citation}")
    if (used := resolve_traces_dir()).resolve() != dest.resolve():
        print(f"note: load tests read traces from {used} (first in the lookup order); pass "
              f"--traces-dir {dest} to use these")
    return 0
