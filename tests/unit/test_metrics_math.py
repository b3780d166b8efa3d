"""Pure metric math: stream timings (TTFT, TPOT), labels, NIXL stat folding, gauge throttling,
histogram quantiles, and reading Prometheus text."""

import math

import pytest

from app.metrics.definitions import (
    ALL_SPECS,
    METRIC_NAMES,
    base_metric_name,
    exported_names,
)
from app.metrics.math import (
    FALLBACK_OUTCOMES,
    GaugeThrottle,
    StreamClock,
    TransferTotals,
    counter_delta,
    fold_transfer_stats,
    inter_token_latencies,
    is_token_event,
    phase_label,
    prefill_outcome,
    quantile_from_buckets,
    status_label,
    stream_label,
    tpot_seconds,
)
from app.metrics.scrape import buckets, by_label, parse_prometheus, total

ROLE = ('data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant",'
        '"content":""},"logprobs":null,"finish_reason":null}]}\n\n')
TOKEN = 'data: {"id":"cmpl-1","choices":[{"index":0,"text":" tok"}]}\n\n'
CHAT_TOKEN = 'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":" a"}}]}\n\n'
USAGE = 'data: {"id":"cmpl-1","choices":[],"usage":{"completion_tokens":3}}\n\n'
DONE = "data: [DONE]\n\n"


def test_tpot_is_mean_gap_after_the_first_token():
    assert tpot_seconds(1.0, 1.3, 4) == pytest.approx(0.1)
    assert tpot_seconds(1.0, 1.0, 1) is None  # one token: nothing to average
    assert tpot_seconds(1.0, 0.5, 3) is None  # clock went backwards: no value
    assert inter_token_latencies([0.0, 0.1, 0.3]) == pytest.approx([0.1, 0.2])
    # TPOT is the mean of the ITLs
    ts = [0.0, 0.02, 0.05, 0.06]
    assert tpot_seconds(ts[0], ts[-1], len(ts)) == pytest.approx(
        sum(inter_token_latencies(ts)) / 3)


def test_token_events_skip_done_usage_and_the_chat_role_chunk():
    assert is_token_event(TOKEN)
    assert is_token_event(CHAT_TOKEN, first=True)
    assert not is_token_event(DONE)
    assert not is_token_event(USAGE)
    assert not is_token_event(ROLE, first=True)
    assert is_token_event(ROLE.replace('"content":""', '"content":"x"'), first=True)


def test_stream_clock_completion():
    clock = StreamClock(start_s=10.0)
    for t, chunk in ((10.05, TOKEN), (10.06, TOKEN), (10.07, TOKEN), (10.08, USAGE),
                     (10.09, DONE)):
        clock.observe(chunk, t)
    assert clock.ttft_s() == pytest.approx(0.05)
    assert clock.token_events == 3 and clock.events == 5
    assert clock.tpot_s() == pytest.approx(0.01)


def test_stream_clock_chat_role_chunk_counts_for_ttft_not_tpot():
    clock = StreamClock(start_s=0.0)
    for t, chunk in ((0.2, ROLE), (0.2, CHAT_TOKEN), (0.3, CHAT_TOKEN), (0.31, DONE)):
        clock.observe(chunk, t)
    assert clock.ttft_s() == pytest.approx(0.2)
    assert clock.tpot_s() == pytest.approx(0.1)


def test_stream_clock_empty_and_single_token():
    clock = StreamClock(start_s=0.0)
    assert clock.ttft_s() is None and clock.tpot_s() is None
    clock.observe(TOKEN, 0.1)
    assert clock.tpot_s() is None


def test_labels():
    assert [phase_label(r) for r in ("prefill", "decode", "aggregated", "x")] == [
        "prefill", "decode", "aggregated", "aggregated"]
    assert status_label(200) == "200" and stream_label(True) == "true"
    assert prefill_outcome() == "ok"
    assert prefill_outcome(timed_out=True) == "timeout"
    assert prefill_outcome(failed=True) == "error"
    assert prefill_outcome(status=400) == "client_error"
    assert prefill_outcome(status=503) == "server_error"
    assert prefill_outcome(has_params=False) == "no_params"
    assert "ok" not in FALLBACK_OUTCOMES and "client_error" not in FALLBACK_OUTCOMES
    assert {"timeout", "error", "server_error", "no_params"} == FALLBACK_OUTCOMES


class _Wrapped:
    def __init__(self, data):
        self.data = data


def test_fold_transfer_stats_nested_and_wrapped():
    stats = {"NixlConnector": _Wrapped({
        "transfer_duration": [0.001, 0.002], "bytes_transferred": [1024, 2048],
        "num_failed_transfers": [], "post_duration": [0.5]})}
    t = fold_transfer_stats(stats)
    assert (t.transfers, t.bytes, t.failures) == (2, 3072, 0)
    assert t.durations_s == [0.001, 0.002]
    fold_transfer_stats({"x": {"num_failed_transfers": [1], "transfer_duration": [math.nan]}},
                        t)
    assert (t.transfers, t.failures, t.durations_s) == (3, 1, [0.001, 0.002])
    assert fold_transfer_stats(None).transfers == 0
    other = TransferTotals(1, 10, 0, [0.5])
    t.add(other)
    assert t.bytes == 3082 and t.durations_s[-1] == 0.5


def test_gauge_throttle():
    g = GaugeThrottle(interval_s=1.0)
    assert g.due(0.0, (1, 0, 0.1), idle=False)
    assert not g.due(0.5, (2, 0, 0.1), idle=False)  # too soon
    assert not g.due(1.5, (1, 0, 0.1), idle=False)  # unchanged
    assert g.due(1.6, (2, 0, 0.1), idle=False)
    assert g.due(1.7, (0, 0, 0.0), idle=True)  # back to idle: at once
    assert not g.due(1.8, (0, 0, 0.0), idle=True)


def test_counter_delta_and_quantiles():
    assert counter_delta(5, 8) == 3 and counter_delta(8, 2) == 2
    bounds, cum = [0.1, 0.2, 0.4], [0, 5, 10, 10]
    assert quantile_from_buckets(bounds, cum, 0.5) == pytest.approx(0.2)
    assert quantile_from_buckets(bounds, cum, 0.75) == pytest.approx(0.3)
    assert quantile_from_buckets(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile_from_buckets(bounds, [0, 0, 0, 4], 0.5) == 0.4  # all above: last bound


def test_specs_are_valid_for_ray():
    names = [s.name for s in ALL_SPECS]
    assert len(names) == len(set(names))
    for spec in ALL_SPECS:
        assert spec.name.startswith("pd_")
        assert spec.kind in ("counter", "gauge", "histogram")
        assert spec.tags[0] == "phase"
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if spec.kind == "histogram":
            assert spec.boundaries and all(b > 0 for b in spec.boundaries)
            assert list(spec.boundaries) == sorted(spec.boundaries)
        # tags Ray Serve reserves for itself
        assert not {"deployment", "replica", "application"} & set(spec.tags)
    assert "pd_router_decisions_total" in METRIC_NAMES


def test_exported_and_base_names():
    assert exported_names("pd_ttft_seconds", "histogram") == [
        "ray_pd_ttft_seconds_bucket", "ray_pd_ttft_seconds_sum", "ray_pd_ttft_seconds_count"]
    assert base_metric_name("ray_pd_ttft_seconds_bucket") == "pd_ttft_seconds"
    assert base_metric_name("ray_pd_requests_total") == "pd_requests_total"
    assert base_metric_name("ray_vllm_time_to_first_token_seconds_count") == (
        "vllm_time_to_first_token_seconds")


PROM = """# HELP ray_pd_requests_total x
# TYPE ray_pd_requests_total counter
ray_pd_requests_total{phase="decode",route="disaggregated",status="200"} 3.0
ray_pd_requests_total{phase="decode",route="local-prefill:short",status="200"} 2.0
ray_pd_ttft_seconds_bucket{le="0.1",phase="decode"} 1.0
ray_pd_ttft_seconds_bucket{le="0.2",phase="decode"} 4.0
ray_pd_ttft_seconds_bucket{le="+Inf",phase="decode"} 5.0
ray_pd_ttft_seconds_count{phase="decode"} 5.0
ray_x{a="q\\"uote"} 1e3
"""


def test_parse_prometheus():
    s = parse_prometheus(PROM)
    assert total(s, "ray_pd_requests_total") == 5
    assert by_label(s, "ray_pd_requests_total", "route") == {
        "disaggregated": 3, "local-prefill:short": 2}
    assert total(s, "ray_pd_requests_total", route="disaggregated") == 3
    bounds, cum = buckets(s, "ray_pd_ttft_seconds", phase="decode")
    assert bounds == [0.1, 0.2] and cum == [1, 4, 5]
    assert s["ray_x"] == [({"a": 'q"uote'}, 1000.0)]
