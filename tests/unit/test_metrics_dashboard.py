"""The Grafana dashboard only queries metrics that exist: every PromQL metric name is one the
code defines (app/metrics/definitions.py, app/routing/metrics.py) or one vLLM defines (read
from vLLM's source text, not imported), as Ray's metrics agent exports them."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from app.metrics.definitions import ALL_SPECS, EXPORT_PREFIX, METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pd-serve-dashboard.json"
# Where vLLM names the metrics its Prometheus (and so RayPrometheusStatLogger) logger records.
VLLM_SOURCES = ("v1/metrics/loggers.py", "distributed/kv_transfer/kv_connector/v1/nixl/stats.py",
                "v1/spec_decode/metrics.py", "v1/metrics/perf.py")
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "avg",
                "le", "label_values", "without", "on", "ignoring", "count"}


def vllm_metric_names() -> set[str]:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    names = set()
    for rel in VLLM_SOURCES:
        path = root / rel
        if path.exists():
            names |= set(re.findall(r'"(vllm:[a-z0-9_]+)"', path.read_text()))
    assert "vllm:num_requests_running" in names
    return {n.replace(":", "_") for n in names}  # Ray's sanitised names


def exported_to_defined(sample: str, vllm: set[str]) -> str | None:
    """The defined metric a scraped sample name comes from, or None."""
    if not sample.startswith(EXPORT_PREFIX):
        return None
    name = sample[len(EXPORT_PREFIX):]
    candidates = [name]
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            candidates.append(name[: -len(suffix)])
    for c in candidates:
        if c in METRIC_NAMES or c in vllm:
            return c
    return None


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for p in board["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for var in board["templating"]["list"]:
        if var.get("type") == "query":
            out.append((var["name"], var["query"]))
    return out


def metric_words(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "", without_ranges)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels))
    by_clauses = set(re.findall(r"by \(([^)]*)\)", without_labels))
    labels = {w.strip() for c in by_clauses for w in c.split(",")}
    return {w for w in words - PROMQL_WORDS - labels if not w.startswith("$")
            and w not in ("application", "phase", "route", "le")}


def test_every_panel_queries_a_defined_metric():
    vllm = vllm_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for title, expr in exprs:
        words = metric_words(expr)
        assert words, (title, expr)
        for word in words:
            assert exported_to_defined(word, vllm), f"{title}: {word} is not a defined metric"


def test_dashboard_shape():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("ttft", "tpot", "route", "fallback", "migration", "queue", "kv-cache usage",
                  "transfer bytes", "transfer time", "predicted vs actual", "vllm"):
        assert topic in titles, topic


def test_the_dashboard_uses_every_phase_metric_of_ours():
    """Each per-phase metric the app defines appears on at least one panel."""
    used = set()
    vllm = vllm_metric_names()
    for _, expr in dashboard_exprs():
        used |= {exported_to_defined(w, vllm) for w in metric_words(expr)}
    missing = {s.name for s in ALL_SPECS} - used
    assert not missing, missing


def test_the_dashboard_json_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", ROOT / "deploy" / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.dashboard()
