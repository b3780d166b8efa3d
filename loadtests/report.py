"""Result files: ``results.json`` (vLLM-compatible names), ``sweep.json``, ``report.md`` and
plots. String builders are pure; the ``write_*`` functions do the I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests.metrics import RequestRecord, percentile_key

RESULTS_FILE = "results.json"
SWEEP_FILE = "sweep.json"
REPORT_FILE = "report.md"

# (header, summary key, format) for the one-line-per-run tables of sweeps and comparisons.
KEY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("done", "completed", "d"),
    ("failed", "failed", "d"),
    ("req/s", "request_throughput", ".2f"),
    ("out tok/s", "output_throughput", ".1f"),
    ("TTFT p50", "p50_ttft_ms", ".1f"),
    ("TTFT p99", "p99_ttft_ms", ".1f"),
    ("TPOT p50", "p50_tpot_ms", ".2f"),
    ("TPOT p99", "p99_tpot_ms", ".2f"),
    ("ITL p99", "p99_itl_ms", ".2f"),
    ("E2E p50", "p50_e2el_ms", ".0f"),
    ("E2E p99", "p99_e2el_ms", ".0f"),
    ("SLO attain.", "slo_attainment", "%"),
    ("goodput req/s", "request_goodput", ".2f"),
)


def fmt(value: Any, spec: str = ".2f") -> str:
    """Table cell: ``-`` for missing values, percentages for ``%``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "%":
        return f"{value * 100:.1f}%"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def load_label(load_kind: str, load: float | None) -> str:
    if load is None:
        return "trace"
    if load_kind == "concurrency":
        return f"conc_{int(load)}"
    return "rate_inf" if math.isinf(load) else f"rate_{load:g}"


def run_result(
    summary: Mapping[str, Any], records: Sequence[RequestRecord], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """One run's ``results.json``: metadata, summary, vLLM's per-request lists, and rows.

    The parallel lists (``input_lens``, ``output_lens``, ``ttfts``, ``itls``, ``latencies``,
    ``start_times``, ``errors``) follow ``vllm bench serve``; ``requests`` holds one row per
    request with everything, including ``tpot`` and whether it met the SLO.
    """
    result: dict[str, Any] = dict(meta)
    result.update(summary)
    result["input_lens"] = [r.prompt_len for r in records]
    result["output_lens"] = [r.output_len for r in records]
    result["ttfts"] = [r.ttft for r in records]
    result["itls"] = [r.itl for r in records]
    result["latencies"] = [r.latency for r in records]
    result["start_times"] = [r.start_time for r in records]
    result["errors"] = [r.error for r in records]
    result["requests"] = [r.to_row() for r in records]
    return result


def latency_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per-metric values in ms from request rows (successful requests only)."""
    ok = [r for r in rows if r.get("success")]
    return {
        "ttft": [r["ttft"] * 1e3 for r in ok if r.get("ttft") is not None],
        "tpot": [r["tpot"] * 1e3 for r in ok if r.get("tpot") is not None],
        "itl": [gap * 1e3 for r in ok for gap in r.get("itl", ())],
        "e2el": [r["latency"] * 1e3 for r in ok if r.get("latency") is not None],
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def key_table(labelled: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
              label_headers: Sequence[str]) -> str:
    """A markdown table with one row per summary and the :data:`KEY_COLUMNS`."""
    headers = [*label_headers, *(h for h, _, _ in KEY_COLUMNS)]
    rows = [
        [*labels, *(fmt(summary.get(key), spec) for _, key, spec in KEY_COLUMNS)]
        for labels, summary in labelled
    ]
    return _table(headers, rows)


def _meta_lines(meta: Mapping[str, Any]) -> list[str]:
    lt = meta.get("loadtests", {})
    wl = lt.get("workload_stats", {})
    lines = [
        f"- Target: `{lt.get('target')}`, model `{meta.get('model_id')}`, {meta.get('date')}",
        f"- Workload: `{lt.get('workload')}`: {wl.get('num_requests')} requests, mean input "
        f"{fmt(wl.get('mean_input_len'), '.0f')} tokens, mean output "
        f"{fmt(wl.get('mean_output_len'), '.0f')} tokens, ideal prefix-cache hit rate "
        f"{fmt(wl.get('ideal_prefix_hit_rate'), '%')} (blocks of {wl.get('cache_block_size')})",
        f"- Arrivals: `{lt.get('arrival')}`"
        + (f", max concurrency {meta['max_concurrency']}" if meta.get("max_concurrency") else ""),
        f"- SLO: {lt.get('slo_text', 'none')}; attainment target "
        f"{fmt(lt.get('attainment_target'), '%')}",
        f"- Prompts: token ids from `{lt.get('token_range')}` ({lt.get('prompt_format')} "
        f"mode), seed {lt.get('seed')}",
        f"- Hardware: {lt.get('hardware_text', '?')}",
        f"- Command: `{lt.get('command')}`",
    ]
    return lines


def _errors_section(error_counts: Mapping[str, int]) -> list[str]:
    if not error_counts:
        return []
    rows = [[str(n), "`" + msg.replace("|", "\\|") + "`"] for msg, n in error_counts.items()]
    return ["", "## Errors", "", _table(["count", "error"], rows)]


def render_run_markdown(result: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """``report.md`` for one run."""
    title = result.get("label") or "load test"
    lines = [f"# Load test: {title}", "", *_meta_lines(result), "", "## Results", ""]
    overview = [
        ("requests", fmt(result.get("num_requests"), "d")),
        ("completed / failed", f"{result.get('completed')} / {result.get('failed')}"),
        ("duration (s)", fmt(result.get("duration"))),
        ("request throughput (req/s)", fmt(result.get("request_throughput"))),
        ("output throughput (tok/s)", fmt(result.get("output_throughput"), ".1f")),
        ("total token throughput (tok/s)", fmt(result.get("total_token_throughput"), ".1f")),
        ("SLO attainment", fmt(result.get("slo_attainment"), "%")),
        ("goodput, vLLM-style (req/s)", fmt(result.get("request_goodput"))),
        ("outputs shorter than asked", fmt(result.get("num_short_outputs"), "d")),
        ("peak concurrent requests", fmt(result.get("max_concurrent_requests"), "d")),
    ]
    if result.get("max_send_lag_ms") is not None:  # open loop: did the client keep up?
        worst = fmt(result.get("max_send_lag_ms"), ".0f")
        overview.append(("sends > 100 ms late / worst lag (ms)",
                         f"{result.get('late_sends')} / {worst}"))
    lines += [_table(["", "value"], [list(row) for row in overview]), "", "## Latency (ms)", ""]
    pcts = result.get("loadtests", {}).get("percentiles", [50, 90, 99])
    headers = ["metric", "mean", "median", *(percentile_key(p) for p in pcts)]
    rows = []
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        rows.append([name, fmt(result.get(f"mean_{key}_ms")), fmt(result.get(f"median_{key}_ms")),
                     *(fmt(result.get(f"{percentile_key(p)}_{key}_ms")) for p in pcts)])
    lines.append(_table(headers, rows))
    lines += _errors_section(result.get("error_counts", {}))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def goodput_line(goodput: Mapping[str, Any], load_kind: str) -> str:
    """One sentence for the DistServe-style goodput of a sweep."""
    unit = "req/s" if load_kind == "rate" else "concurrent requests"
    status = goodput.get("status")
    target = fmt(goodput.get("target"), "%")
    if status == "none_pass":
        return f"below the lowest {load_kind} swept (no point reached {target} attainment)"
    if status == "empty":
        return "no SLO given"
    text = f"{fmt(goodput.get('goodput'))} {unit}"
    if status == "all_pass":
        return text + f" (every point reached {target}: a lower bound, sweep higher)"
    return text + f" (attainment crosses {target} at ~{fmt(goodput.get('interpolated'))} {unit})"


def render_sweep_markdown(sweep: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """``report.md`` for a sweep over rates or concurrencies."""
    kind = sweep["load_kind"]
    lines = [f"# Load sweep: {sweep.get('label') or 'load test'}", "", *_meta_lines(sweep), ""]
    lines += [f"## Results by {kind}", "", "Latencies in ms; failed requests count as SLO "
              "misses.", ""]
    lines.append(key_table([([fmt(p["load"], ".4g")], p) for p in sweep["points"]], [kind]))
    lines += ["", "## Goodput", ""]
    lines.append("- vLLM-style (requests meeting every SLO per second): column "
                 "`goodput req/s` above.")
    if "goodput_distserve" in sweep:
        lines.append(f"- DistServe-style (highest {kind} with >= "
                     f"{fmt(sweep['goodput_distserve'].get('target'), '%')} of requests "
                     f"meeting all SLOs): "
                     f"{goodput_line(sweep['goodput_distserve'], kind)}")
    errors: dict[str, int] = {}
    for point in sweep["points"]:
        for msg, n in point.get("error_counts", {}).items():
            errors[msg] = errors.get(msg, 0) + n
    lines += _errors_section(errors)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Per-point details: " + ", ".join(
        f"[{p['dir']}]({p['dir']}/{REPORT_FILE})" for p in sweep["points"])]
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_run_outputs(out: Path, result: Mapping[str, Any], plots: bool = True) -> list[Path]:
    """``results.json``, plots and ``report.md`` for one run in ``out``."""
    from loadtests import plots as plotting

    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out / RESULTS_FILE, result)]
    names: list[str] = []
    if plots:
        written.append(plotting.plot_latency_cdfs(
            {str(result.get("label") or "run"): latency_series(result["requests"])},
            out / "latency_cdf.png"))
        written.append(plotting.plot_timeline(result["requests"], out / "timeline.png"))
        names = ["latency_cdf.png", "timeline.png"]
    (out / REPORT_FILE).write_text(render_run_markdown(result, names))
    written.append(out / REPORT_FILE)
    return written


def write_sweep_outputs(
    out: Path, sweep: Mapping[str, Any], point_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    plots: bool = True,
) -> list[Path]:
    """``sweep.json``, sweep plots and ``report.md`` in ``out`` (points are in subdirs)."""
    from loadtests import plots as plotting

    written = [write_json(out / SWEEP_FILE, sweep)]
    names: list[str] = []
    if plots:
        label = str(sweep.get("label") or "run")
        kind = sweep["load_kind"]
        curves = {label: sweep["points"]}
        written.append(plotting.plot_latency_vs_load(curves, out / "latency_vs_load.png", kind))
        names.append("latency_vs_load.png")
        if sweep.get("slo"):
            written.append(plotting.plot_attainment_vs_load(
                curves, out / "attainment_vs_load.png",
                sweep["loadtests"]["attainment_target"], sweep["loadtests"]["slo_text"], kind))
            names.append("attainment_vs_load.png")
        written.append(plotting.plot_latency_cdfs(
            {f"{kind} {fmt(p['load'], 'g')}": latency_series(point_rows[p["dir"]])
             for p in sweep["points"]},
            out / "latency_cdf.png"))
        names.append("latency_cdf.png")
    (out / REPORT_FILE).write_text(render_sweep_markdown(sweep, names))
    written.append(out / REPORT_FILE)
    return written
