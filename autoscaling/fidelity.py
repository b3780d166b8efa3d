"""How close is the simulator to a real run? Replay the requests of a measured CPU load test
through :mod:`autoscaling.sim` and compare latencies.

The load tests of ``loadtests/scenarios/pd_vs_aggregated.py`` (``azure:conv,n=40,
input_scale=0.5,max_input=1800,max_output=64``, Poisson arrivals at 0.5..2 req/s, seed 0,
``small-llama``) wrote every request's send time, prompt and output lengths, TTFT and TPOT to
``results/<run>/<mode>/results/rate_<r>/results.json``. This replays exactly those requests
(same lengths, same send times) on the same fixed layout (1 prefill + 1 decode replica, or
the aggregated replicas) with the ``cpu-small-llama`` profile, and prints sim vs real TTFT and
TPOT p50/p99 with the relative error::

    python -m autoscaling.fidelity                       # prints, writes its BENCHMARKS section
    python -m autoscaling.fidelity --no-write results/conditional_azure_v2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.sim.cluster import SimConfig, simulate
from autoscaling.sim.drivers import FixedDriver
from autoscaling.sim.workload import SimRequest, make_requests
from loadtests.mdsection import update_file
from loadtests.metrics import percentile

ROOT = Path(__file__).resolve().parents[1]
SECTION = "autoscaling:fidelity"
DEFAULT_RUNS = ("results/conditional_azure_v2", "results/conditional_azure")
TARGET = 0.20
METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")


@dataclass
class Measured:
    """One rate of one real run: the requests as sent and their measured latencies (ms)."""

    run: str
    mode: str
    rate: str
    rows: list[tuple[float, int, int]]  # (send time s, prompt tokens, output tokens)
    ttft_ms: list[float]
    tpot_ms: list[float]
    replicas: dict[str, int]


def _replicas(mode_dir: Path, mode: str) -> dict[str, int]:
    """Replica counts from the run's serve config (defaults: 1 + 1, or 2 aggregated)."""
    counts = {"prefill": 1, "decode": 1} if mode == "disaggregated" else {"aggregated": 2}
    cfg = mode_dir / "serve_config.yaml"
    if cfg.exists():
        import yaml

        args = yaml.safe_load(cfg.read_text())["applications"][0].get("args", {})
        for phase in counts:
            n = (args.get(phase) or {}).get("num_replicas")
            if n:
                counts[phase] = int(n)
    return counts


def read_run(run_dir: Path, mode: str) -> list[Measured]:
    out = []
    mode_dir = run_dir / mode
    for path in sorted((mode_dir / "results").glob("rate_*/results.json"),
                       key=lambda p: float(p.parent.name.removeprefix("rate_"))):
        data = json.loads(path.read_text())
        reqs = [r for r in data["requests"] if r.get("success", True)]
        if not reqs:
            continue
        t0 = min(r["start_time"] for r in reqs)
        rows = [(r["start_time"] - t0, int(r["prompt_len"]),
                 int(r.get("output_len") or r["output_len_requested"])) for r in reqs]
        ttft = [r["ttft"] * 1e3 for r in reqs]
        tpot = [r["tpot"] * 1e3 for r in reqs
                if (r.get("output_len") or r["output_len_requested"]) > 1]
        out.append(Measured(run_dir.name, mode, path.parent.name.removeprefix("rate_"), rows,
                            ttft, tpot, _replicas(mode_dir, mode)))
    return out


def stats(ttft: list[float], tpot: list[float]) -> dict[str, float]:
    return {"ttft_p50": percentile(ttft, 50) or 0.0, "ttft_p99": percentile(ttft, 99) or 0.0,
            "tpot_p50": percentile(tpot, 50) or 0.0, "tpot_p99": percentile(tpot, 99) or 0.0}


def replay(m: Measured, profile: Profile) -> list[SimRequest]:
    layout = "disaggregated" if m.mode == "disaggregated" else "aggregated"
    reqs = make_requests(m.rows)
    settings = AutoscalingSettings(enabled=False, profile=profile.name)
    simulate(reqs, SimConfig(profile, settings, layout=layout, initial=m.replicas),
             FixedDriver(m.replicas))
    return reqs


def sim_stats(reqs: list[SimRequest]) -> dict[str, float]:
    done = [r for r in reqs if r.done]
    return stats([r.ttft_ms for r in done], [r.tpot_ms for r in done if r.output > 1])


def rel(sim: float, real: float) -> float:
    return (sim - real) / real if real else float("nan")


def lone_prompt_profile(profile: Profile) -> Profile:
    """The profile with only its lone-prompt prefill points (``batch`` 1).

    ``Profile.prefill_ms(tokens)`` averages every point at a token count, lone prompts and
    batches alike; on CPU a lone long prompt costs far more than the same tokens split over
    several prompts (attention grows with the square of a prompt's length), and at these
    rates the engine mostly prefills one prompt per step.
    """
    data = profile.model_dump()
    data["prefill"] = [p for p in data["prefill"] if p["batch"] == 1]
    data["name"] = f"{profile.name} (lone-prompt prefill points)"
    return Profile.model_validate(data)


def compare(measured: list[Measured], profile: Profile, per_rate: bool = True
            ) -> list[dict]:
    """Per rate (optional), then pooled over all rates of a run and mode."""
    rows = []
    pooled: dict[tuple[str, str], tuple[list, list, list, list]] = {}
    for m in measured:
        reqs = replay(m, profile)
        real, sim = stats(m.ttft_ms, m.tpot_ms), sim_stats(reqs)
        if per_rate:
            rows.append({"run": m.run, "mode": m.mode, "rate": m.rate, "n": len(m.rows),
                         "real": real, "sim": sim, "profile": profile.name})
        acc = pooled.setdefault((m.run, m.mode), ([], [], [], []))
        acc[0].extend(m.ttft_ms)
        acc[1].extend(m.tpot_ms)
        acc[2].extend(r.ttft_ms for r in reqs if r.done)
        acc[3].extend(r.tpot_ms for r in reqs if r.done and r.output > 1)
    for (run, mode), (rt, rp, st, sp) in pooled.items():
        rows.append({"run": run, "mode": mode, "rate": "all", "n": len(rt),
                     "real": stats(rt, rp), "sim": stats(st, sp), "profile": profile.name})
    return rows


def table(rows: list[dict]) -> list[str]:
    head = ("| profile | run | mode | rate | requests | " + " | ".join(
        f"{m.replace('_', ' ')} real / sim ms (err)" for m in METRICS) + " |")
    lines = [head, "|" + "---|" * (5 + len(METRICS))]
    for r in rows:
        cells = []
        for m in METRICS:
            real, sim = r["real"][m], r["sim"][m]
            cells.append(f"{real:,.1f} / {sim:,.1f} ({rel(sim, real):+.0%})")
        rate = "**all**" if r["rate"] == "all" else r["rate"]
        lines.append(f"| {r['profile']} | {r['run']} | {r['mode']} | {rate} | {r['n']} | "
                     + " | ".join(cells) + " |")
    return lines


def section(rows: list[dict], profile: Profile, command: str) -> str:
    lines = [
        "## Simulator fidelity: replaying a measured CPU run (issue 8)",
        "",
        f"Generated by `python -m autoscaling.fidelity` ({datetime.now():%Y%m%d-%H%M%S}). The "
        "requests of the CPU load tests of `loadtests/scenarios/pd_vs_aggregated.py` (their "
        "send times, prompt and output lengths, read from the per-request results) replayed "
        "through `autoscaling/sim/` on the same fixed layout with the "
        f"`{profile.name}` profile; p50/p99 of the simulated vs the measured latencies, "
        "relative error in brackets (sim - real) / real.",
        "",
        f"- Command: `{command}`",
        f"- Profile: `{profile.name}`: {profile.source}",
        "",
        *table(rows),
        "",
    ]
    mark = {True: "✅", False: "❌"}
    pooled_real: dict[str, list[tuple[str, dict]]] = {}
    for r in rows:
        if r["rate"] == "all" and r["profile"] == profile.name:
            pooled_real.setdefault(r["mode"], []).append((r["run"], r["real"]))
    for mode, runs in pooled_real.items():
        if len(runs) >= 2:
            (a, ra), (b, rb) = runs[0], runs[1]
            diffs = ", ".join(f"{m.replace('_', ' ')} {rel(ra[m], rb[m]):+.0%}" for m in METRICS)
            lines.append(f"- Noise reference: the two real runs of the same workload "
                         f"({mode}, {a} vs {b}) differ by {diffs}.")
    for r in rows:
        if r["rate"] != "all":
            continue
        errs = {m: rel(r["sim"][m], r["real"][m]) for m in METRICS}
        ok = ", ".join(f"{m.replace('_', ' ')} {mark[abs(e) <= TARGET]} {e:+.0%}"
                       for m, e in errs.items())
        lines.append(f"- `{r['profile']}`, {r['run']} / {r['mode']}, all rates pooled "
                     f"(target within {TARGET:.0%}): {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoscaling.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help=f"run directories (default: {DEFAULT_RUNS})")
    ap.add_argument("--profile", default="cpu-small-llama")
    ap.add_argument("--modes", default="disaggregated",
                    help="comma-separated: disaggregated, aggregated")
    ap.add_argument("--no-lone-prompt-variant", dest="lone_prompt_variant",
                    action="store_false", help="skip the diagnostic replay with only the "
                    "profile's lone-prompt prefill points")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    profile = Profile.load(args.profile)
    runs = [Path(r) for r in (args.runs or DEFAULT_RUNS)]
    measured = []
    for run in runs:
        run = run if run.is_absolute() or run.exists() else ROOT / run
        for mode in args.modes.split(","):
            measured += read_run(run, mode)
    if not measured:
        print(f"no results.json under {[str(r) for r in runs]}", file=sys.stderr)
        return 1
    rows = compare(measured, profile)
    if args.lone_prompt_variant:
        rows += compare(measured, lone_prompt_profile(profile), per_rate=False)
    print("\n".join(table(rows)))
    cmd = shlex.join(["python", "-m", "autoscaling.fidelity",
                      *(argv if argv is not None else sys.argv[1:])])
    body = section(rows, profile, cmd)
    if not args.no_write:
        update_file(Path(args.doc), SECTION, body)
        print(f"wrote {args.doc} ({SECTION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
