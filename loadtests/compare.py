"""``python -m loadtests compare DIR1 DIR2 ...``: side-by-side tables and overlay plots of
runs or sweeps (e.g. aggregated vs disaggregated at the same rates)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtests.report import (
    KEY_COLUMNS,
    RESULTS_FILE,
    SWEEP_FILE,
    fmt,
    goodput_line,
    key_table,
    latency_series,
    read_json,
)


@dataclass
class LoadedResult:
    """A result directory: one run (``results.json``) or a sweep (``sweep.json``)."""

    label: str
    path: Path
    load_kind: str
    points: list[dict[str, Any]]  # summaries, each with "load" and "dir"
    goodput: dict[str, Any] | None
    meta: dict[str, Any]

    def rows(self, point: dict[str, Any]) -> list[dict[str, Any]]:
        """Per-request rows of one point (read lazily: they can be large)."""
        data = read_json(self.path / point["dir"] / RESULTS_FILE)
        return list(data.get("requests", []))


def load_result_dir(path: Path, label: str | None = None) -> LoadedResult:
    if (path / SWEEP_FILE).is_file():
        sweep = read_json(path / SWEEP_FILE)
        return LoadedResult(label or sweep.get("label") or path.name, path, sweep["load_kind"],
                            sweep["points"], sweep.get("goodput_distserve"), sweep)
    if (path / RESULTS_FILE).is_file():
        run = read_json(path / RESULTS_FILE)
        point = {k: v for k, v in run.items() if k not in ("requests", "itls", "ttfts")}
        point["dir"] = "."
        load_kind = run.get("loadtests", {}).get("load_kind", "rate")
        return LoadedResult(label or run.get("label") or path.name, path, load_kind, [point],
                            None, run)
    raise FileNotFoundError(f"{path} holds neither {SWEEP_FILE} nor {RESULTS_FILE}")


def _ordered(results: Sequence[LoadedResult]) -> list[tuple[float, LoadedResult, dict[str, Any]]]:
    """(load, result, point) grouped by load so equal loads sit side by side."""
    rows = []
    for k, res in enumerate(results):
        for point in res.points:
            load = point.get("load")
            rows.append((math.inf if load is None else float(load), k, res, point))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [(load, res, point) for load, _, res, point in rows]


def compare_markdown(results: Sequence[LoadedResult]) -> str:
    """Markdown tables: key metrics per (load, setup), then goodput per setup."""
    kind = results[0].load_kind if results else "rate"
    table = key_table([([fmt(load, ".4g"), res.label], point)
                       for load, res, point in _ordered(results)], [kind, "setup"])
    lines = ["Latencies in ms; failed requests count as SLO misses.", "", table]
    if any(r.goodput for r in results):
        lines += ["", "| setup | DistServe-style goodput |", "|---|---|"]
        for res in results:
            text = goodput_line(res.goodput, res.load_kind) if res.goodput else "- (single run)"
            lines.append(f"| {res.label} | {text} |")
    return "\n".join(lines) + "\n"


def compare_table(results: Sequence[LoadedResult]) -> Table:
    kind = results[0].load_kind if results else "rate"
    table = Table(title="loadtests compare", header_style="bold")
    table.add_column(kind, justify="right")
    table.add_column("setup")
    for header, _, _ in KEY_COLUMNS:
        table.add_column(header, justify="right")
    previous = None
    for load, res, point in _ordered(results):
        if previous is not None and load != previous:
            table.add_section()
        previous = load
        table.add_row(fmt(load, ".4g"), res.label,
                      *(fmt(point.get(key), spec) for _, key, spec in KEY_COLUMNS))
    return table


def _cdf_point(res: LoadedResult, load: float | None) -> dict[str, Any]:
    if load is not None:
        for point in res.points:
            if point.get("load") is not None and math.isclose(point["load"], load):
                return point
    return max(res.points, key=lambda p: -math.inf if p.get("load") is None else p["load"])


def compare_plots(results: Sequence[LoadedResult], out: Path, prefix: str = "",
                  cdf_load: float | None = None) -> list[Path]:
    """``{prefix}latency_vs_load.png``, ``{prefix}attainment_vs_load.png`` (when an SLO was
    set) and ``{prefix}latency_cdf.png`` at ``cdf_load`` (default: the highest load every
    setup ran)."""
    from loadtests import plots

    out.mkdir(parents=True, exist_ok=True)
    kind = results[0].load_kind
    curves = {r.label: [p for p in r.points if p.get("load") is not None] for r in results}
    written = [plots.plot_latency_vs_load(curves, out / f"{prefix}latency_vs_load.png", kind)]
    with_slo = [r for r in results if r.points and r.points[0].get("slo")]
    if with_slo:
        lt = with_slo[0].meta.get("loadtests", {})
        written.append(plots.plot_attainment_vs_load(
            {r.label: curves[r.label] for r in with_slo}, out / f"{prefix}attainment_vs_load.png",
            lt.get("attainment_target", 0.9), lt.get("slo_text", ""), kind))
    if cdf_load is None:
        common = set.intersection(*({p.get("load") for p in r.points} for r in results)) - {None}
        cdf_load = max(common) if common else None
    series = {}
    for res in results:
        point = _cdf_point(res, cdf_load)
        where = f" @ {kind} {fmt(point.get('load'), '.4g')}" if point.get("load") else ""
        series[res.label + where] = latency_series(res.rows(point))
    written.append(plots.plot_latency_cdfs(series, out / f"{prefix}latency_cdf.png"))
    return written


def run_compare(dirs: Sequence[Path], labels: Sequence[str] | None, out: Path | None,
                cdf_load: float | None, console: Console) -> list[LoadedResult]:
    if labels and len(labels) != len(dirs):
        raise ValueError("give one label per directory")
    results = [load_result_dir(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    kinds = {r.load_kind for r in results}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare a rate sweep with a concurrency sweep ({kinds})")
    console.print(compare_table(results))
    for res in results:
        if res.goodput:
            console.print(f"{res.label}: DistServe-style goodput "
                          f"{goodput_line(res.goodput, res.load_kind)}")
    if out is not None:
        paths = compare_plots(results, out, cdf_load=cdf_load)
        md = ["# loadtests compare", "", ", ".join(f"`{r.path}` as {r.label}" for r in results),
              "", compare_markdown(results), *(f"![{p.name}]({p.name})" for p in paths)]
        (out / "compare.md").write_text("\n".join(md) + "\n")
        console.print(f"comparison written to {out}/compare.md")
    return results
