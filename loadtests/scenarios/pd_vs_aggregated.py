"""Aggregated vs prefill/decode-disaggregated serving, same cores, same traffic.

Starts the app (``serve run`` of ``app.builder:build_app``) in ``aggregated`` mode (2
replicas, one core each) and then in ``disaggregated`` mode (1 prefill + 1 decode replica,
one core each) on the ``small`` model, runs the same long-prompt Poisson workload at several
rates against each, and writes the comparison into ``docs/BENCHMARKS.md`` between its own
markers, with plots under ``docs/img/``. It takes the whole machine for ~15-20 minutes::

    python -m loadtests.scenarios.pd_vs_aggregated

``--report-only`` rebuilds the docs section from existing results without running anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S
from loadtests.bench import BenchConfig, run_benchmark
from loadtests.compare import compare_markdown, compare_plots, load_result_dir
from loadtests.envinfo import hardware, hardware_line
from loadtests.mdsection import update_file
from loadtests.metrics import SLO
from loadtests.priority import PRIORITIES
from loadtests.servers import (
    port_free,
    repo_env,
    start_serve_run,
    stop_process_group,
    wait_ready,
)
from loadtests.spec import ArrivalSpec, LengthDist, SyntheticSpec, parse_rates, parse_workload
from loadtests.traces import repo_root

SECTION = "loadtests:pd_vs_aggregated"
MODES = ("aggregated", "disaggregated", "conditional")
MODE_TEXT = {
    "aggregated": "2 replicas serving both phases, one core each (cores 0 and 1)",
    "disaggregated": "1 prefill replica on core 0 + 1 decode replica on core 1, KV cache "
                     "moved over NIXL, every request prefilled remotely (`routing.policy: "
                     "power_of_two`)",
    "conditional": "the disaggregated layout with the KV-aware router (`routing.policy: kv`): "
                   "prompts the decode replica would prefill in under "
                   "`local_prefill_max_tokens` stay there, the rest go to the prefill replica",
}


def app_args(mode: str, model_path: str, served_name: str, max_model_len: int,
             local_prefill_max_tokens: int = 256) -> dict[str, Any]:
    """The app's config (``build_app`` args, ``app.config.AppConfig``) for one mode.

    Both modes get identical engine settings and two cores; only the layout differs. This is
    the one place to adapt when the app's schema moves (a unit test validates it).
    """
    routing: dict[str, Any] = {"policy": "power_of_two"}
    if mode == "conditional":
        routing = {"policy": "kv", "advertise_host": "127.0.0.1",
                   "local_prefill_max_tokens": local_prefill_max_tokens}
    return {
        "model": {"path": model_path, "served_model_name": served_name},
        "mode": "aggregated" if mode == "aggregated" else "disaggregated",
        "engine_args": {
            "max_model_len": max_model_len,
            "block_size": 32,  # vLLM-CPU attention needs a multiple of 32
            "enforce_eager": True,
            "kv_cache_memory_bytes": 2 * 1024**3,
        },
        "aggregated": {"num_replicas": 2, "cpu_cores": ["0", "1"]},
        "prefill": {"num_replicas": 1, "cpu_cores": ["0"]},
        "decode": {"num_replicas": 1, "cpu_cores": ["1"]},
        "nixl": {"side_channel_host": "127.0.0.1", "progress_delay_us": 100},
        "engine_process": {"shm_busy_loop_s": SMALL_HOST_SHM_BUSY_LOOP_S},  # as local.yaml
        # disaggregated: the phase split itself, every request remote; conditional: the KV
        # router decides per request.
        "routing": routing,
    }


def serve_config(mode: str, model_path: str, served_name: str, host: str, port: int,
                 max_model_len: int, local_prefill_max_tokens: int = 256) -> dict[str, Any]:
    """A ``serve run`` config file: one application, HTTP on ``host:port``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [{
            "name": "pd",
            "route_prefix": "/",
            "import_path": "app.builder:build_app",
            "args": app_args(mode, model_path, served_name, max_model_len,
                             local_prefill_max_tokens),
        }],
    }


def _workload(args: argparse.Namespace):
    if args.workload:  # e.g. azure:conv,n=60,max_input=1800: the trace's lengths, Poisson times
        return parse_workload(args.workload)
    return SyntheticSpec(n=args.n, input=LengthDist(a=args.input_len),
                         output=LengthDist(a=args.output_len))


def run_mode(mode: str, args: argparse.Namespace, command: str, console: Console) -> Path:
    out = args.out / mode
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(
        serve_config(mode, args.model_path, args.served_model_name, args.host, args.port,
                     args.max_model_len, args.local_prefill_max_tokens),
        sort_keys=False))
    if not port_free(args.host, args.port):
        raise RuntimeError(f"{args.host}:{args.port} is in use; stop whatever serves there")
    log = out / "serve.log"
    env = repo_env()
    root = str(repo_root())
    console.rule(f"{mode}: starting the app ({config_path})")
    proc = start_serve_run(config_path, log, root, env)
    base = f"http://{args.host}:{args.port}"
    try:
        t0 = time.monotonic()
        wait_ready(base, args.served_model_name, proc, log, args.startup_timeout)
        console.print(f"{mode}: ready after {time.monotonic() - t0:.0f} s")
        cfg = BenchConfig(
            target=base, model=args.served_model_name, workload=_workload(args),
            out=out / "results", arrival=ArrivalSpec(kind="poisson"), rates=args.rates,
            slo=args.slo, attainment_target=args.attainment_target, seed=args.seed,
            warmup=args.warmup, tokenizer_dir=repo_root() / args.model_path, label=mode,
            command=command, progress=not args.no_progress,
            client_priority=args.client_priority,
        )
        asyncio.run(run_benchmark(cfg, console))
    finally:
        stop_process_group(proc, args.host, args.port)
        console.print(f"app stopped (exit {proc.returncode})")
    return out / "results"


def _rel(path: Path) -> str:
    """``path`` relative to the repository root when inside it (docs must not hold /work/...)."""
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def docs_section(args: argparse.Namespace, command: str, results: dict[str, Path],
                 img_dir: Path, docs: Path) -> str:
    """The Markdown between this scenario's markers."""
    loaded = [load_result_dir(path, mode) for mode, path in results.items()]
    img_rel = os.path.relpath(img_dir, docs.parent)
    prefix = args.section.split(":")[-1] + "_"
    paths = compare_plots(loaded, img_dir, prefix=prefix)
    meta = loaded[0].meta.get("loadtests", {})
    command = meta.get("command") or command  # the run's command, also with --report-only
    hw = meta.get("hardware") or hardware()
    rates = ", ".join(f"{p['load']:g}" for p in loaded[0].points)
    when = loaded[0].meta.get("date") or datetime.now().strftime("%Y%m%d-%H%M%S")
    title = ("## Conditional disaggregation vs pure aggregated and pure disaggregated (CPU)"
             if "conditional" in results else
             "## Prefill/decode disaggregation vs aggregated serving (CPU)")
    lines = [
        title,
        "",
        f"Generated by `loadtests/scenarios/pd_vs_aggregated.py` ({when}, commit "
        f"`{hw.get('git_commit') or '?'}`). Same two cores, same traffic, two layouts:",
        "",
        *(f"- **{mode}**: {MODE_TEXT[mode]}" for mode in results),
        "",
        f"- Command: `{command}`",
        f"- Hardware: {hardware_line(hw)}",
        f"- Model: `{args.served_model_name}` (`{args.model_path}`)",
        f"- Workload: `{meta.get('workload')}` (token-id prompts, `ignore_eos`), Poisson "
        f"arrivals at {rates} req/s, a fresh prompt set per rate (seed {meta.get('seed')}), "
        f"{meta.get('warmup')} warm-up request(s) per setup",
        f"- SLO: {meta.get('slo_text')}; DistServe-style goodput = highest rate with >= "
        f"{meta.get('attainment_target', args.attainment_target):.0%} of requests meeting "
        "both",
        "",
        compare_markdown(loaded).strip(),
        "",
        *_conditional_target(loaded),
        *(f"![{p.stem}]({img_rel}/{p.name})" for p in paths),
        "",
        f"Raw per-request results: `{_rel(args.out)}/<mode>/results/` (not committed); "
        f"compare again with `python -m loadtests compare "
        f"{' '.join(_rel(p) for p in results.values())}`.",
    ]
    return "\n".join(lines)


def _goodput(result) -> float:
    g = result.goodput or {}
    value = g.get("interpolated") if g.get("interpolated") is not None else g.get("goodput")
    return float(value or 0.0)


def _conditional_target(loaded) -> list[str]:
    """Issue 7: conditional goodput >= 1.2 x the better of the two pure layouts."""
    by_label = {r.label: r for r in loaded}
    if not {"conditional", "aggregated", "disaggregated"} <= set(by_label):
        return []
    cond = _goodput(by_label["conditional"])
    best = max(_goodput(by_label["aggregated"]), _goodput(by_label["disaggregated"]))
    ok = best > 0 and cond >= 1.2 * best
    return [f"- {'✅' if ok else '❌'} conditional goodput {cond:.2f} req/s vs 1.2 × the better "
            f"pure layout ({best:.2f}) = {1.2 * best:.2f} (interpolated crossing of the "
            "attainment target where available)", ""]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.scenarios.pd_vs_aggregated",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=parse_rates, default=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
                   metavar="R[,R...]", help="Poisson rates in req/s")
    p.add_argument("--n", type=int, default=50, help="requests per rate")
    p.add_argument("--input-len", type=int, default=1000, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="output tokens")
    p.add_argument("--workload", default=None,
                   help="a loadtests workload spec instead of the synthetic one, e.g. "
                   "'azure:conv,n=60,max_input=1800,max_output=64' (arrivals stay Poisson)")
    p.add_argument("--local-prefill-max-tokens", type=int, default=256,
                   help="conditional mode: the router's local-prefill threshold")
    p.add_argument("--section", default=SECTION, help="docs section to write")
    p.add_argument("--slo", type=SLO.parse, default=SLO(ttft_ms=1500, tpot_ms=100),
                   metavar="ttft=MS,tpot=MS")
    p.add_argument("--attainment-target", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-path", default="models/small-llama")
    p.add_argument("--served-model-name", default="small-llama")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--modes", default="aggregated,disaggregated",
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", type=Path, default=Path("results/pd_vs_aggregated"))
    p.add_argument("--docs", type=Path, default=Path("docs/BENCHMARKS.md"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the docs section from existing results")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--client-priority", choices=PRIORITIES, default="normal",
                   help="realtime: the load generator on SCHED_FIFO (root), so the engines "
                        "on the same cores cannot starve the measurement")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    console = Console(stderr=True)
    root = repo_root()  # relative paths (model, docs, results) are from the repo root
    args.out, args.docs, args.img_dir = (p if p.is_absolute() else root / p
                                         for p in (args.out, args.docs, args.img_dir))
    command = shlex.join(["python", "-m", "loadtests.scenarios.pd_vs_aggregated", *raw])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        console.print(f"[red]unknown modes {sorted(unknown)}[/]")
        return 2
    if not args.report_only and not (root / args.model_path / "config.json").is_file():
        console.print(f"[red]{args.model_path} not found[/]: build it with "
                      "`python -m app.tiny_model --size small --out models/small-llama`")
        return 2
    results: dict[str, Path] = {}
    for mode in modes:
        if args.report_only:
            results[mode] = args.out / mode / "results"
        else:
            results[mode] = run_mode(mode, args, command, console)
    section = docs_section(args, command, results, args.img_dir, args.docs)
    update_file(args.docs, args.section, section)
    console.print(f"wrote {args.docs} (section {args.section}) and plots in {args.img_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
