"""Streaming client, load driver and end-to-end bench/report/compare against an in-process
fake OpenAI server (httpx.MockTransport): no network, no vLLM."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from loadtests.bench import BenchConfig, run_benchmark
from loadtests.client import CompletionsClient, api_root, sse_data
from loadtests.compare import load_result_dir, run_compare
from loadtests.metrics import SLO, RequestRecord
from loadtests.runner import run_load
from loadtests.spec import ArrivalSpec, parse_workload
from loadtests.workloads import Request

pytestmark = pytest.mark.timeout(60)


class FakeServer:
    """Streams one ``x`` per token; fails requests whose first prompt id is ``fail_id``."""

    def __init__(self, vocab: int = 4096, fail_id: int | None = None, gap: float = 0.001,
                 mode: str = "ok") -> None:
        self.vocab, self.fail_id, self.gap, self.mode = vocab, fail_id, gap, mode
        self.in_flight = self.peak = 0
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        if request.url.path == "/detokenize":  # text = ids joined, like a 1:1 tokenizer
            return httpx.Response(200, json={"prompt": " ".join(map(str, body["tokens"]))})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [int(t) for t in body["prompt"].split()]})
        self.bodies.append(body)
        prompt = body["prompt"]
        if isinstance(prompt, list) and max(prompt) >= self.vocab:
            return httpx.Response(400, json={"error": {"message": "Token id is out of vocabulary"}})
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": "x"}]})
        if isinstance(prompt, list) and prompt and prompt[0] == self.fail_id:
            return httpx.Response(500, json={"error": {"message": "engine died"}})
        n = body["max_tokens"]
        prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def events() -> Any:
            # The client stops reading at [DONE], so count the request as finished before it.
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.mode == "error_event":
                self.in_flight -= 1
                yield b'data: {"error": {"message": "oops"}}\n\n'
                return
            if self.mode != "empty":
                for _ in range(n):
                    await asyncio.sleep(self.gap)
                    chunk = {"choices": [{"index": 0, "text": "x"}], "usage": None}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            self.in_flight -= 1
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})


def client_for(server: FakeServer, **kw: Any) -> CompletionsClient:
    return CompletionsClient("http://fake/v1", "fake-model", transport=httpx.MockTransport(server),
                             **kw)


def request(i: int = 0, n_prompt: int = 12, n_out: int = 5, first: int = 300) -> Request:
    return Request(f"req-{i}", [first] + [301] * (n_prompt - 1), n_out)


def test_sse_and_url_helpers() -> None:
    assert sse_data("data: {}") == "{}"
    assert sse_data("data:[DONE]") == "[DONE]"
    assert sse_data(": ping") is None and sse_data("") is None
    assert api_root("http://h:1/v1/") == "http://h:1" and api_root("http://h:1") == "http://h:1"


@pytest.mark.asyncio
async def test_stream_measures_ttft_itl_and_lengths() -> None:
    server = FakeServer(gap=0.01)
    async with client_for(server) as client:
        rec = RequestRecord("r", 12, 5)
        await client.stream(request(), rec, asyncio.get_running_loop().time)
    assert rec.success and rec.error == ""
    assert rec.output_len == 5 and rec.prompt_len == 12
    assert len(rec.itl) == 4  # one gap per chunk after the first
    assert rec.ttft is not None and rec.latency is not None and rec.latency >= rec.ttft
    assert rec.latency - rec.ttft == pytest.approx(sum(rec.itl))
    assert rec.tpot == pytest.approx(sum(rec.itl) / 4)
    body = server.bodies[0]
    assert body["prompt"] == request().prompt  # token ids by default
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("server", "req", "expected"),
    [
        (FakeServer(fail_id=300), request(), "HTTP 500: engine died"),
        (FakeServer(vocab=200), request(), "HTTP 400: Token id is out of vocabulary"),
        (FakeServer(mode="error_event"), request(), "stream error: oops"),
        (FakeServer(mode="empty"), request(), "stream ended without any token"),
    ],
)
@pytest.mark.asyncio
async def test_stream_failures_are_recorded(server: FakeServer, req: Request,
                                            expected: str) -> None:
    async with client_for(server) as client:
        rec = RequestRecord("r", 12, 5)
        await client.stream(req, rec, asyncio.get_running_loop().time)
    assert not rec.success and rec.error == expected


@pytest.mark.asyncio
async def test_connection_errors_are_recorded() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client = CompletionsClient("http://fake", "m", transport=httpx.MockTransport(refuse))
    async with client:
        rec = RequestRecord("r", 1, 1)
        await client.stream(request(), rec, asyncio.get_running_loop().time)
    assert not rec.success and rec.error == "ConnectError: connection refused"


@pytest.mark.parametrize("vocab", [4096, 300, 257, 1])
@pytest.mark.asyncio
async def test_probe_vocab_size(vocab: int) -> None:
    async with client_for(FakeServer(vocab=vocab)) as client:
        assert await client.probe_vocab_size() == vocab


@pytest.mark.asyncio
async def test_open_loop_accounts_for_every_request_and_keeps_schedule() -> None:
    server = FakeServer(fail_id=999)
    reqs = [request(i, first=999 if i % 3 == 0 else 300) for i in range(9)]
    offsets = [0.02 * i for i in range(9)]
    done: list[str] = []
    async with client_for(server) as client:
        outcome = await run_load(client, reqs, offsets, on_done=lambda r: done.append(r.error))
    assert [r.request_id for r in outcome.records] == [r.request_id for r in reqs]
    assert len(done) == 9
    assert sum(not r.success for r in outcome.records) == 3
    assert all(r.start_time >= r.scheduled_time - 1e-3 for r in outcome.records)  # type: ignore[operator]
    assert outcome.duration >= offsets[-1]


@pytest.mark.asyncio
async def test_closed_loop_respects_concurrency_and_max_concurrency() -> None:
    server = FakeServer(gap=0.005)
    reqs = [request(i) for i in range(10)]
    async with client_for(server) as client:
        outcome = await run_load(client, reqs, None, concurrency=3)
    assert all(r.success for r in outcome.records) and server.peak == 3
    server2 = FakeServer(gap=0.005)
    async with client_for(server2) as client:
        outcome = await run_load(client, reqs, [0.0] * 10, max_concurrency=2)
    assert server2.peak == 2 and all(r.success for r in outcome.records)
    assert max(r.queue_time for r in outcome.records) > 0


@pytest.mark.asyncio
async def test_bench_sweep_writes_results_reports_and_compares(tmp_path: Path) -> None:
    server = FakeServer(fail_id=None, gap=0.002)
    console = Console(file=io.StringIO(), width=200)
    outs = {}
    for label in ("a", "b"):
        cfg = BenchConfig(
            target="http://fake:8000", workload=parse_workload("synthetic:n=6,input=20,output=4"),
            out=tmp_path / label, arrival=ArrivalSpec(kind="poisson"), rates=[50.0, 100.0],
            slo=SLO(ttft_ms=1000, tpot_ms=1000), vocab_size=4096, label=label, progress=False,
            command="python -m loadtests run ...",
        )
        sweep = await run_benchmark(cfg, console, transport=httpx.MockTransport(server))
        outs[label] = cfg.out
        assert sweep["kind"] == "sweep" and len(sweep["points"]) == 2
        assert sweep["goodput_distserve"]["status"] == "all_pass"
        assert sweep["goodput_distserve"]["goodput"] == 100.0
    out = outs["a"]
    run = json.loads((out / "rate_50" / "results.json").read_text())
    for key in ("completed", "failed", "request_throughput", "output_throughput",
                "mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "input_lens", "output_lens",
                "ttfts", "itls", "latencies", "errors", "request_rate", "burstiness"):
        assert key in run
    assert run["completed"] == 6 and run["failed"] == 0
    assert run["input_lens"] == [20] * 6 and run["output_lens"] == [4] * 6
    assert run["request_rate"] == 50.0 and len(run["requests"]) == 6
    assert run["loadtests"]["token_range"] == "204:3892"
    # Different load points get different prompts (no cross-point prefix cache hits).
    run2 = json.loads((out / "rate_100" / "results.json").read_text())
    assert run2["loadtests"]["seed"] != run["loadtests"]["seed"]
    for name in ("sweep.json", "report.md", "latency_vs_load.png", "attainment_vs_load.png",
                 "latency_cdf.png", "rate_50/report.md", "rate_50/latency_cdf.png"):
        assert (out / name).is_file(), name
    assert "DistServe-style" in (out / "report.md").read_text()

    loaded = load_result_dir(out)
    assert loaded.load_kind == "rate" and [p["load"] for p in loaded.points] == [50.0, 100.0]
    cmp_out = tmp_path / "cmp"
    run_compare([outs["a"], outs["b"]], ["A", "B"], cmp_out, None, console)
    md = (cmp_out / "compare.md").read_text()
    assert "| 50 | A |" in md and "| 100 | B |" in md
    for name in ("latency_vs_load.png", "attainment_vs_load.png", "latency_cdf.png"):
        assert (cmp_out / name).is_file()


@pytest.mark.asyncio
async def test_bench_single_trace_run_and_text_free_failures(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    rows = [{"timestamp": 10 * i, "input_length": 1024, "output_length": 3,
             "hash_ids": [0, i + 1]} for i in range(5)]
    (traces / "mooncake_synthetic_trace.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n")
    server = FakeServer(vocab=4096)
    cfg = BenchConfig(
        target="http://fake:8000", workload=parse_workload("mooncake:block=16"),
        out=tmp_path / "out", traces_dir=traces, token_range=None, vocab_size=None,
        progress=False, plots=False, warmup=0,
    )
    console = Console(file=io.StringIO())
    result = await run_benchmark(cfg, console, transport=httpx.MockTransport(server))
    assert result["completed"] == 5 and result["input_lens"] == [32] * 5
    assert result["loadtests"]["token_range_source"] == "probed vocabulary size 4096"
    assert result["loadtests"]["workload_stats"]["ideal_prefix_hit_rate"] == pytest.approx(0.4)
    assert result["request_rate"] == pytest.approx(100.0)  # 4 gaps over 0.04 s
    prompts = [b["prompt"] for b in server.bodies if b.get("stream")]
    assert all(p[:16] == prompts[0][:16] for p in prompts)  # shared hash id 0
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.asyncio
async def test_text_mode_sends_strings_of_exact_length(tmp_path: Path) -> None:
    server = FakeServer()
    cfg = BenchConfig(
        target="http://fake:8000", workload=parse_workload("synthetic:n=3,input=7,output=2"),
        out=tmp_path / "text", rates=[100.0], prompt_format="text", vocab_size=4096,
        progress=False, plots=False, warmup=0,
    )
    console = Console(file=io.StringIO())
    result = await run_benchmark(cfg, console, transport=httpx.MockTransport(server))
    streamed = [b for b in server.bodies if b.get("stream")]
    assert len(streamed) == 3
    assert all(isinstance(b["prompt"], str) and len(b["prompt"].split()) == 7 for b in streamed)
    assert all(b["add_special_tokens"] is False for b in streamed)
    assert result["input_lens"] == [7, 7, 7] and result["completed"] == 3


def test_bench_overrides_set_top_level_and_nested_keys():
    from loadtests.servers import apply_overrides

    args = {"handoff": {"timeline": True}, "prefill": {"cpu_cores": ["0"]}}
    out = apply_overrides(args, ['handoff.transfer="push"',
                                 "prefill.engine_args.max_num_batched_tokens=512"])
    assert out["handoff"] == {"timeline": True, "transfer": "push"}
    assert out["prefill"] == {"cpu_cores": ["0"],
                              "engine_args": {"max_num_batched_tokens": 512}}
