"""Replay a trace through the simulated pools under one autoscaling policy.

::

    python -m autoscaling.simulate --trace azure:conv --compress 10 --policy pd \\
        --profile h100-llama-3.1-8b --ttft-slo-ms 500 --itl-slo-ms 50 --plot /tmp/pd.png

Prints SLO attainment (TTFT and TPOT both met), goodput, replica-seconds per phase, TTFT and
TPOT percentiles, and plots replicas over time. Policies: ``pd`` (ours, the production
``PDAppPolicy``), ``ray-default`` (Ray Serve's default policy per phase), ``dynamo-planner``
(Dynamo-style SLA planner), ``fixed`` (``--fixed P,D``). See :mod:`autoscaling.sim` for the
model and :mod:`autoscaling.baselines` for the baselines' exact rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from autoscaling.baselines import DynamoConfig, RayDefaultConfig, ray_tuned_targets
from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.sim.cluster import LAYOUTS, SimConfig, SimResult, simulate
from autoscaling.sim.drivers import (
    Driver,
    DynamoDriver,
    FixedDriver,
    PDDriver,
    RayDefaultDriver,
)
from autoscaling.sim.report import format_summary, plot_replicas, summarize
from autoscaling.sim.workload import SimRequest, load_trace

POLICIES = ("pd", "ray-default", "dynamo-planner", "fixed")


def make_settings(profile: str, ttft_slo_ms: float, itl_slo_ms: float, max_replicas: int,
                  min_replicas: int = 1, overrides: dict[str, Any] | None = None
                  ) -> AutoscalingSettings:
    """The app's settings for a replay: SLOs, the same bounds on every phase, overrides."""
    bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas}
    base: dict[str, Any] = {"enabled": True, "profile": profile, "ttft_slo_ms": ttft_slo_ms,
                            "itl_slo_ms": itl_slo_ms, "prefill": dict(bounds),
                            "decode": dict(bounds), "aggregated": dict(bounds)}
    for k, v in (overrides or {}).items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) \
            else v
    return AutoscalingSettings.model_validate(base)


def _counts(text: str, phases: tuple[str, ...]) -> dict[str, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != len(phases):
        raise SystemExit(f"expected {len(phases)} comma-separated counts for {phases}")
    return dict(zip(phases, parts, strict=True))


def ray_targets(spec: str, profile: Profile, requests: list[SimRequest],
                settings: AutoscalingSettings, phases: tuple[str, ...]) -> dict[str, float]:
    """``tuned`` (one-replica load test at the SLOs, see ``ray_tuned_targets``), ``default``
    (Ray's 2), a number for every phase, or ``P,D``."""
    if spec == "default":
        return dict.fromkeys(phases, RayDefaultConfig().target_ongoing_requests)
    if spec == "tuned":
        n = max(len(requests), 1)
        mp = sum(r.prompt for r in requests) / n
        mo = sum(r.output for r in requests) / n
        pre, dec = ray_tuned_targets(profile, mp, mo, settings.ttft_slo_ms, settings.itl_slo_ms)
        # Aggregated: one engine does both; its requests live as long as a decode's.
        return {"prefill": pre, "decode": dec, "aggregated": dec}
    vals = [float(x) for x in spec.split(",")]
    if len(vals) == 1:
        return dict.fromkeys(phases, vals[0])
    return dict(zip(phases, vals, strict=True))


def build_driver(policy: str, profile: Profile, settings: AutoscalingSettings,
                 phases: tuple[str, ...], requests: list[SimRequest], *,
                 fixed: dict[str, int] | None = None, ray_target: str = "tuned",
                 dynamo_interval_s: float = 180.0) -> Driver:
    if policy == "pd":
        return PDDriver(settings, phases)
    if policy == "ray-default":
        return RayDefaultDriver(settings, phases,
                                ray_targets(ray_target, profile, requests, settings, phases))
    if policy == "dynamo-planner":
        if phases != ("prefill", "decode"):
            raise SystemExit("dynamo-planner sizes a disaggregated deployment only")
        budget = settings.budget or (settings.prefill.max_replicas * settings.prefill.replica_cost
                                     + settings.decode.max_replicas * settings.decode.replica_cost)
        return DynamoDriver(profile, DynamoConfig(
            ttft_slo_ms=settings.ttft_slo_ms, itl_slo_ms=settings.itl_slo_ms,
            adjustment_interval_s=dynamo_interval_s,
            min_endpoint=max(settings.prefill.min_replicas, settings.decode.min_replicas, 1),
            max_gpu_budget=budget, prefill_engine_num_gpu=settings.prefill.replica_cost,
            decode_engine_num_gpu=settings.decode.replica_cost))
    if policy == "fixed":
        if not fixed:
            raise SystemExit("--policy fixed needs --fixed P,D (or N for aggregated)")
        return FixedDriver(fixed)
    raise SystemExit(f"unknown policy {policy!r}; one of {POLICIES}")


def run_one(requests: list[SimRequest], profile: Profile, settings: AutoscalingSettings,
            layout: str, driver: Driver, initial: dict[str, int] | None = None,
            tick_s: float = 1.0) -> SimResult:
    cfg = SimConfig(profile=profile, settings=settings, layout=layout, initial=initial,
                    tick_s=tick_s)
    return simulate(requests, cfg, driver)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m autoscaling.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure:conv",
                    help="azure:conv, azure:code, mooncake, or a trace file")
    ap.add_argument("--traces-dir", help="default: ../shared/traces or $LOADTESTS_TRACES_DIR")
    ap.add_argument("--compress", type=float, default=1.0,
                    help="divide arrival times by this (X times the rate)")
    ap.add_argument("--peak-window", type=float, metavar="S",
                    help="keep only the busiest S seconds of the trace (before compressing)")
    ap.add_argument("--max-requests", type=int)
    ap.add_argument("--max-prompt", type=int, help="clip prompts (a model's context limit)")
    ap.add_argument("--policy", choices=POLICIES, default="pd")
    ap.add_argument("--profile", default="h100-llama-3.1-8b", help="profile name or path")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="disaggregated")
    ap.add_argument("--ttft-slo-ms", type=float, default=500.0)
    ap.add_argument("--itl-slo-ms", type=float, default=50.0)
    ap.add_argument("--min-replicas", type=int, default=1)
    ap.add_argument("--max-replicas", type=int, default=16, help="per phase")
    ap.add_argument("--settings", help="JSON object of AutoscalingSettings overrides, or a "
                    "path to one")
    ap.add_argument("--initial", help="replicas serving at t=0, 'P,D' (default: the minimum)")
    ap.add_argument("--fixed", help="replica counts for --policy fixed, 'P,D' or 'N'")
    ap.add_argument("--ray-target", default="tuned",
                    help="ray-default's target_ongoing_requests: tuned, default (=2), a "
                    "number, or P,D")
    ap.add_argument("--dynamo-interval", type=float, default=180.0,
                    help="dynamo-planner adjustment_interval seconds (Dynamo's default 180)")
    ap.add_argument("--tick-s", type=float, default=1.0, help="autoscaler period")
    ap.add_argument("--warmup-s", type=float, default=0.0, help="leave requests arriving "
                    "earlier, and replica time before it, out of the figures")
    ap.add_argument("--plot", help="write the replicas-over-time plot here")
    ap.add_argument("--json", help="write the summary as JSON here")
    return ap


def _overrides(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    path = Path(text)
    return json.loads(path.read_text() if path.exists() else text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    profile = Profile.load(args.profile)
    phases = LAYOUTS[args.layout]
    settings = make_settings(args.profile, args.ttft_slo_ms, args.itl_slo_ms, args.max_replicas,
                             args.min_replicas, _overrides(args.settings))
    requests = load_trace(args.trace, args.traces_dir, args.compress, args.peak_window,
                          args.max_requests, args.max_prompt)
    if not requests:
        print("no requests in that trace selection", file=sys.stderr)
        return 1
    fixed = _counts(args.fixed, phases) if args.fixed else None
    driver = build_driver(args.policy, profile, settings, phases, requests, fixed=fixed,
                          ray_target=args.ray_target, dynamo_interval_s=args.dynamo_interval)
    initial = _counts(args.initial, phases) if args.initial else fixed
    res = run_one(requests, profile, settings, args.layout, driver, initial, args.tick_s)
    summary = summarize(res, settings.ttft_slo_ms, settings.itl_slo_ms, args.warmup_s)
    print(f"trace:             {args.trace} x{args.compress:g} compressed, {len(requests)} "
          f"requests; profile {profile.name}; layout {args.layout}; SLO TTFT <= "
          f"{settings.ttft_slo_ms:g} ms, TPOT <= {settings.itl_slo_ms:g} ms")
    print(format_summary(summary))
    if args.plot:
        print(f"plot:              {plot_replicas([res], args.plot, args.policy)}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
