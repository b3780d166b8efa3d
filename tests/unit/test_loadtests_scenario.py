"""The P/D vs aggregated scenario without running it: its app config validates against the
app's schema, and ``--report-only`` writes only its own section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.metrics import SLO, RequestRecord, summarize
from loadtests.report import run_result, write_json, write_run_outputs
from loadtests.scenarios import pd_vs_aggregated as scenario


@pytest.mark.parametrize("mode", scenario.MODES)
def test_app_args_validate_against_app_config(mode: str) -> None:
    config = pytest.importorskip("app.config")
    cfg = config.AppConfig.model_validate(
        scenario.app_args(mode, "models/small-llama", "small-llama", 2048))
    assert cfg.mode == ("aggregated" if mode == "aggregated" else "disaggregated")
    assert cfg.routing.policy == ("kv" if mode == "conditional" else "power_of_two")
    assert sum(p.num_replicas for _, p in cfg.phases()) == 2  # same two cores either way
    serve = scenario.serve_config(mode, "models/small-llama", "small-llama", "127.0.0.1", 8000,
                                  2048)
    assert serve["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert serve["applications"][0]["import_path"] == "app.builder:build_app"


def _fake_sweep(out: Path, label: str, ttft: float) -> None:
    slo = SLO(ttft_ms=150, tpot_ms=50)
    points = []
    for i, rate in enumerate((1.0, 2.0)):
        records = [
            RequestRecord(f"req-{k}", 1000, 4, scheduled_time=k / rate, start_time=k / rate,
                          ttft=ttft * (1 + i), itl=[0.02] * 3, latency=ttft * (1 + i) + 0.06,
                          output_len=4, success=True)
            for k in range(4)
        ]
        meta = {"label": label, "model_id": "small-llama", "date": "20250101-000000",
                "load": rate, "loadtests": {
                    "workload": "synthetic:n=4,input=1000,output=4", "seed": "0",
                    "warmup": 2, "slo_text": slo.describe(), "attainment_target": 0.9,
                    "command": "python -m loadtests.scenarios.pd_vs_aggregated --n 4",
                    "hardware": {"nproc": 2, "cpu_model": "test cpu", "git_commit": "abc"},
                    "load_kind": "rate"}}
        result = run_result(summarize(records, 4 / rate, slo), records, meta)
        write_run_outputs(out / f"rate_{rate:g}", result, plots=False)
        point = {k: v for k, v in result.items() if k != "requests"}
        point["dir"] = f"rate_{rate:g}"
        points.append(point)
    write_json(out / "sweep.json", {"kind": "sweep", "load_kind": "rate", "label": label,
                                    "date": "20250101-000000",
                                    "loadtests": points[0]["loadtests"], "slo": points[0]["slo"],
                                    "points": points, "goodput_distserve": {
                                        "goodput": 1.0, "interpolated": 1.5, "status": "ok",
                                        "target": 0.9}})


def test_report_only_writes_its_section_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _fake_sweep(out / "aggregated" / "results", "aggregated", 0.1)
    _fake_sweep(out / "disaggregated" / "results", "disaggregated", 0.12)
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    docs.parent.mkdir()
    before = "# Benchmarks\n\n<!-- other:start -->\nother section\n<!-- other:end -->\n"
    docs.write_text(before)
    rc = scenario.main(["--report-only", "--out", str(out), "--docs", str(docs),
                        "--img-dir", str(tmp_path / "docs" / "img")])
    assert rc == 0
    text = docs.read_text()
    assert text.startswith(before)
    start, end = (f"<!-- loadtests:pd_vs_aggregated:{edge} -->" for edge in ("start", "end"))
    section = text[text.index(start) : text.index(end)]
    assert "python -m loadtests.scenarios.pd_vs_aggregated --n 4" in section
    assert "test cpu" in section and "| 2 | disaggregated |" in section
    assert "](img/pd_vs_aggregated_latency_vs_load.png)" in section
    for name in ("latency_vs_load", "attainment_vs_load", "latency_cdf"):
        assert (tmp_path / "docs" / "img" / f"pd_vs_aggregated_{name}.png").is_file()
    # Running again replaces the section in place.
    assert scenario.main(["--report-only", "--out", str(out), "--docs", str(docs),
                          "--img-dir", str(tmp_path / "docs" / "img")]) == 0
    assert docs.read_text() == text
