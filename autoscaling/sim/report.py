"""What a replay scored: SLO attainment, goodput, latency percentiles, replica-seconds, and
the replicas-over-time plot.

A request meets the SLO when both its TTFT and its TPOT (mean gap after the first token,
``loadtests.metrics``' definition) are within their objectives; an unfinished request misses.
Goodput is SLO-meeting requests per second of replay (first arrival to last token).

``warmup_s``: requests arriving earlier, and replica time before it, are left out, so that
policies started from the same cold state are compared once they have settled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from autoscaling.sim.cluster import SimResult
from loadtests.metrics import percentile


@dataclass(frozen=True)
class Summary:
    driver: str
    requests: int
    finished: int
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    goodput_rps: float
    duration_s: float
    replica_seconds: dict[str, float]
    total_replica_seconds: float
    peak_replicas: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    scale_events: int
    wall_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(res: SimResult, ttft_slo_ms: float, itl_slo_ms: float,
              warmup_s: float = 0.0) -> Summary:
    reqs = [r for r in res.requests if r.arrival >= warmup_s]
    done = [r for r in reqs if r.done]
    ttft_ok = [r for r in done if r.ttft_ms <= ttft_slo_ms]
    tpot_ok = [r for r in done if r.tpot_ms <= itl_slo_ms]
    good = [r for r in done if r.ttft_ms <= ttft_slo_ms and r.tpot_ms <= itl_slo_ms]
    n = max(len(reqs), 1)
    start = max(min((r.arrival for r in res.requests), default=0.0), warmup_s)
    duration = max(res.horizon_s - start, 1e-9)
    rs = {p: sum(max(end - max(begin, start), 0.0) for begin, end in life)
          for p, life in res.lifetimes.items()} if res.lifetimes else dict(res.replica_seconds)
    ttfts = [r.ttft_ms for r in done]
    tpots = [r.tpot_ms for r in done if r.output > 1]

    def pct(values: list[float], p: float) -> float:
        v = percentile(values, p)
        return math.nan if v is None else v

    peaks = {p: max([replicas_at(tl, start)] + [s.running + s.starting for s in tl
                                                  if s.t >= start])
             for p, tl in res.timelines.items()}
    return Summary(
        driver=res.driver, requests=len(reqs), finished=len(done),
        attainment=len(good) / n, ttft_attainment=len(ttft_ok) / n,
        tpot_attainment=len(tpot_ok) / n, goodput_rps=len(good) / duration,
        duration_s=duration, replica_seconds=rs,
        total_replica_seconds=sum(rs.values()), peak_replicas=peaks,
        ttft_p50_ms=pct(ttfts, 50), ttft_p99_ms=pct(ttfts, 99),
        tpot_p50_ms=pct(tpots, 50), tpot_p99_ms=pct(tpots, 99),
        scale_events=sum(1 for t, _, _ in res.decisions if t >= start), wall_s=res.wall_s)


def replicas_at(timeline: list, t: float) -> int:
    """Replicas starting or running at time ``t`` (the last sample at or before it)."""
    n = 0
    for s in timeline:
        if s.t > t:
            break
        n = s.running + s.starting
    return n


def format_summary(s: Summary) -> str:
    rs = ", ".join(f"{p} {v:,.0f}" for p, v in s.replica_seconds.items())
    peaks = ", ".join(f"{p} {v}" for p, v in s.peak_replicas.items())
    return "\n".join([
        f"policy:            {s.driver}",
        f"requests:          {s.finished}/{s.requests} finished over {s.duration_s:,.0f} s",
        f"SLO attainment:    {s.attainment:.1%} (TTFT {s.ttft_attainment:.1%}, "
        f"TPOT {s.tpot_attainment:.1%})",
        f"goodput:           {s.goodput_rps:.2f} req/s",
        f"replica-seconds:   {s.total_replica_seconds:,.0f} ({rs})",
        f"peak replicas:     {peaks}; scale events {s.scale_events}",
        f"TTFT p50 / p99:    {s.ttft_p50_ms:,.1f} / {s.ttft_p99_ms:,.1f} ms",
        f"TPOT p50 / p99:    {s.tpot_p50_ms:,.2f} / {s.tpot_p99_ms:,.2f} ms",
        f"simulated in:      {s.wall_s:.1f} s",
    ])


def arrival_rate(res: SimResult, bin_s: float) -> tuple[list[float], list[float]]:
    if not res.requests:
        return [], []
    end = max(r.arrival for r in res.requests)
    bins = [0] * (int(end // bin_s) + 1)
    for r in res.requests:
        bins[int(r.arrival // bin_s)] += 1
    return [(i + 0.5) * bin_s for i in range(len(bins))], [b / bin_s for b in bins]


def plot_replicas(results: list[SimResult], path: str | Path, title: str = "",
                  warmup_s: float = 0.0) -> Path:
    """Replicas (running + starting) per phase over time, one line per policy, with the
    arrival rate behind them (and the warm-up, left out of the figures, hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(results[0].timelines)
    fig, axes = plt.subplots(len(phases), 1, figsize=(10, 3.2 * len(phases)), sharex=True,
                             squeeze=False)
    horizon = max(r.horizon_s for r in results)
    bin_s = max(horizon / 120, 1.0)
    xs, rate = arrival_rate(results[0], bin_s)
    for ax, phase in zip(axes[:, 0], phases, strict=True):
        twin = ax.twinx()
        twin.fill_between(xs, rate, step="mid", color="0.85", zorder=0)
        twin.set_ylabel("arrivals (req/s)", color="0.5")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        if warmup_s > 0:
            ax.axvspan(0, warmup_s, color="0.6", alpha=0.15, hatch="//", linewidth=0,
                       label="warm-up")
        styles = ("-", "--", "-.", ":")
        for i, res in enumerate(results):
            tl = res.timelines[phase]
            ax.step([s.t for s in tl], [s.running + s.starting for s in tl], where="post",
                    label=res.driver, linewidth=1.6, linestyle=styles[i % len(styles)])
        ax.set_ylabel(f"{phase} replicas")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("simulated time (s)")
    if title:
        axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
