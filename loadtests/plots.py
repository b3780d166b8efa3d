"""PNG plots with matplotlib (headless Agg backend): latency CDFs, latency and SLO attainment
versus offered load, and a per-request timeline. Inputs are plain numbers, so ``compare``
and the scenario scripts reuse the same functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(series: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """One CDF panel per metric; ``series[label][metric]`` holds values in ms."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (metric, title) in zip(axes.flat, METRICS, strict=True):
        everything: list[float] = []
        for label, values in series.items():
            data = sorted(v for v in values.get(metric, ()) if v is not None)
            if not data:
                continue
            everything += (data[0], data[-1])
            ys = [(i + 1) / len(data) for i in range(len(data))]
            ax.step(data, ys, where="post", label=label)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if everything:
            lo, hi = min(everything), max(everything)
            if lo > 0 and hi / lo > 30:
                ax.set_xscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Latency CDFs")
    _save(plt, fig, path)
    return path


def plot_latency_vs_load(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, load_name: str = "rate"
) -> Path:
    """TTFT and TPOT p50 (solid) and p99 (dashed) against offered load, one colour per label.

    ``curves[label]`` is a list of run summaries, each with a ``load`` key.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        for k, (label, points) in enumerate(curves.items()):
            pts = sorted(points, key=lambda p: p["load"])
            xs = [p["load"] for p in pts]
            color = colors[k % len(colors)]
            for stat, style in (("p50", "-"), ("p99", "--")):
                ys = [p.get(f"{stat}_{metric}_ms") for p in pts]
                xy = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
                if xy:
                    ax.plot(*zip(*xy, strict=True), style, marker="o", color=color,
                            label=f"{label} {stat}")
        ax.set_title(f"{metric.upper()} vs {load_name}")
        ax.set_xlabel(_load_axis(load_name))
        ax.set_ylabel("ms")
        _style(ax)
    _save(plt, fig, path)
    return path


def plot_attainment_vs_load(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    target: float,
    slo_text: str,
    load_name: str = "rate",
) -> Path:
    """SLO attainment (all SLOs: solid; TTFT only: dotted; TPOT only: dash-dot) vs load."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, points) in enumerate(curves.items()):
        pts = sorted(points, key=lambda p: p["load"])
        color = colors[k % len(colors)]
        for key, style, suffix in (("slo_attainment", "-", "all SLOs"),
                                   ("ttft_attainment", ":", "TTFT"),
                                   ("tpot_attainment", "-.", "TPOT")):
            xy = [(p["load"], p[key] * 100) for p in pts if p.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), style, marker="o" if style == "-" else None,
                        color=color, label=f"{label} ({suffix})")
    ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1,
               label=f"target {target:.0%}")
    ax.set_ylim(0, 102)
    ax.set_xlabel(_load_axis(load_name))
    ax.set_ylabel("% of requests meeting SLO")
    ax.set_title(f"SLO attainment ({slo_text})")
    _style(ax)
    _save(plt, fig, path)
    return path


def plot_timeline(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """TTFT and E2E latency of each request against its send time; failures marked x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ok = [r for r in rows if r.get("success")]
    if ok:
        ax.scatter([r["start_time"] for r in ok], [r["latency"] * 1e3 for r in ok], s=10,
                   label="E2E latency")
        ax.scatter([r["start_time"] for r in ok], [r["ttft"] * 1e3 for r in ok], s=10,
                   label="TTFT")
    failed = [r for r in rows if not r.get("success")]
    if failed:
        ax.scatter([r["start_time"] for r in failed], [0] * len(failed), marker="x",
                   color="red", label=f"failed ({len(failed)})")
    ax.set_xlabel("send time (s since start)")
    ax.set_ylabel("ms")
    ax.set_title("Per-request latency over the run")
    _style(ax)
    _save(plt, fig, path)
    return path


def _style(ax: Any) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_axis(load_name: str) -> str:
    return "offered rate (req/s)" if load_name == "rate" else "concurrency (requests in flight)"
