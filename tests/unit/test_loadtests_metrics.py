"""Metric math of loadtests on hand-computed cases: percentiles, TPOT/ITL, attainment,
vLLM-style and DistServe-style goodput."""

from __future__ import annotations

import math

import pytest

from loadtests.metrics import (
    SLO,
    RequestRecord,
    attainment,
    describe,
    distserve_goodput,
    error_kind,
    max_concurrency,
    peak_output_tokens_per_s,
    percentile,
    percentile_key,
    request_goodput,
    summarize,
    tpot,
)


def rec(ttft: float | None = 0.1, latency: float | None = 1.0, out: int = 10,
        itl: list[float] | None = None, ok: bool = True, start: float = 0.0,
        prompt: int = 100, error: str = "") -> RequestRecord:
    return RequestRecord(
        request_id="r", prompt_len=prompt, output_len_requested=out, start_time=start,
        ttft=ttft, itl=itl or [], latency=latency, output_len=out if ok else 0, success=ok,
        error=error,
    )


# ---- percentiles --------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_order_statistics() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5  # rank 1.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7 -> 3 + 0.7
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_percentile_matches_numpy_default() -> None:
    np = pytest.importorskip("numpy")
    values = [0.3, 12.0, 5.5, 5.5, 1.25, 99.0, 42.0]
    for p in (1, 25, 50, 75, 90, 99, 99.9):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_describe_mean_median_population_std_and_keys() -> None:
    stats = describe([1.0, 2.0, 3.0, 4.0], (50, 99.9))
    assert stats["mean"] == 2.5
    assert stats["median"] == 2.5
    assert stats["std"] == pytest.approx(math.sqrt(1.25))  # population std, like np.std
    assert set(stats) == {"mean", "median", "std", "p50", "p99.9"}
    assert describe([], (50,)) == {"mean": None, "median": None, "std": None, "p50": None}
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9"


# ---- TPOT / ITL ---------------------------------------------------------------------


def test_tpot_excludes_the_first_token() -> None:
    # 10 tokens: the first at 0.1 s, the last at 1.0 s -> 9 gaps over 0.9 s.
    assert tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert tpot(1.0, 0.1, 1) is None  # no second token, no TPOT
    assert tpot(None, 0.1, 10) is None
    assert rec(out=10).tpot == pytest.approx(0.1)
    assert rec(ok=False).tpot is None


def test_itl_pools_every_gap_and_tpot_averages_per_request() -> None:
    # Request A: chunks at 0.1, 0.2, 0.4 (ITL 0.1, 0.2); request B: chunks at 0.2, 0.5 (0.3).
    a = rec(ttft=0.1, latency=0.4, out=3, itl=[0.1, 0.2])
    b = rec(ttft=0.2, latency=0.5, out=2, itl=[0.3])
    s = summarize([a, b], duration=1.0)
    assert s["mean_itl_ms"] == pytest.approx(200.0)  # (100 + 200 + 300) / 3 gaps
    assert s["median_itl_ms"] == pytest.approx(200.0)
    # TPOT: A (0.4 - 0.1) / 2 = 150 ms, B (0.5 - 0.2) / 1 = 300 ms -> mean 225 ms.
    assert s["mean_tpot_ms"] == pytest.approx(225.0)
    assert s["p50_tpot_ms"] == pytest.approx(225.0)


# ---- SLO attainment and goodput -----------------------------------------------------


def test_slo_parse_and_checks() -> None:
    slo = SLO.parse("ttft=200,tpot=50")
    assert slo == SLO(ttft_ms=200, tpot_ms=50)
    assert SLO.parse("TTFT_ms=1,e2el=3") == SLO(ttft_ms=1, e2el_ms=3)
    assert not SLO.parse("").is_set
    with pytest.raises(ValueError):
        SLO.parse("latency=5")
    assert slo.met(rec(ttft=0.2, latency=0.2 + 9 * 0.05, out=10))  # both exactly at limit
    assert not slo.met(rec(ttft=0.201, latency=0.3, out=10))
    assert not slo.met(rec(ttft=0.1, latency=0.1 + 9 * 0.051, out=10))
    assert slo.met(rec(ttft=0.1, latency=5.0, out=1))  # one token: TPOT counts as 0
    assert not slo.met(rec(ok=False))  # failures always miss
    assert SLO(e2el_ms=500).met(rec(latency=0.5)) and not SLO(e2el_ms=500).met(rec(latency=0.6))


def test_attainment_counts_failures_as_misses() -> None:
    slo = SLO(ttft_ms=100, tpot_ms=10)
    records = [
        rec(ttft=0.05, latency=0.05 + 9 * 0.005, out=10),  # meets both
        rec(ttft=0.5, latency=0.5 + 9 * 0.005, out=10),  # misses TTFT
        rec(ttft=0.05, latency=0.05 + 9 * 0.05, out=10),  # misses TPOT
        rec(ok=False, ttft=None, latency=None, error="HTTP 500: boom"),
    ]
    assert attainment(records, slo) == 0.25
    assert attainment(records, slo.only("ttft")) == 0.5
    assert attainment(records, slo.only("tpot")) == 0.5
    assert attainment(records, SLO()) is None
    # vLLM-style goodput: 1 good request over a 2 s run.
    assert request_goodput(records, slo, 2.0) == 0.5
    assert request_goodput(records, SLO(), 2.0) is None
    s = summarize(records, 2.0, slo)
    assert (s["slo_attainment"], s["ttft_attainment"], s["tpot_attainment"]) == (0.25, 0.5, 0.5)
    assert s["request_goodput"] == 0.5
    assert s["failed"] == 1 and s["error_counts"] == {"HTTP 500: boom": 1}


def test_error_counts_group_messages_differing_in_numbers() -> None:
    assert error_kind("HTTP 400: prompt has 2285 tokens, limit 2048") == \
        "HTTP 400: prompt has N tokens, limit N"
    assert error_kind("timeout (ReadTimeout)") == "timeout (ReadTimeout)"
    assert error_kind("") == "unknown error"
    assert error_kind("v1.2 took 3.5 s") == "v1.2 took N s"
    failed = [rec(ok=False, error=f"HTTP 400: prompt has {n} tokens") for n in (2100, 2300)]
    s = summarize([*failed, rec(ok=False, error="HTTP 503: busy")], 1.0)
    assert s["error_counts"] == {"HTTP 400: prompt has N tokens": 2, "HTTP 503: busy": 1}


def test_distserve_goodput_is_highest_rate_before_first_miss() -> None:
    points = [(3.0, 0.85), (1.0, 1.0), (2.0, 0.95), (4.0, 0.92)]  # unsorted; 4.0 is noise
    g = distserve_goodput(points, 0.9)
    assert g.status == "ok" and g.goodput == 2.0
    # crossing between (2, 0.95) and (3, 0.85): 2 + 0.05 / 0.10 * 1 = 2.5
    assert g.interpolated == pytest.approx(2.5)


def test_distserve_goodput_edges() -> None:
    all_pass = distserve_goodput([(1, 0.99), (2, 0.9)], 0.9)  # exactly at target passes
    assert (all_pass.status, all_pass.goodput, all_pass.interpolated) == ("all_pass", 2, 2)
    none = distserve_goodput([(1, 0.5), (2, 0.95)], 0.9)
    assert (none.status, none.goodput, none.interpolated) == ("none_pass", 0.0, None)
    assert distserve_goodput([], 0.9).status == "empty"
    assert distserve_goodput([(1, None)], 0.9).status == "none_pass"  # no SLO data: miss
    custom = distserve_goodput([(1, 0.8), (2, 0.6)], 0.7)
    assert custom.goodput == 1 and custom.interpolated == pytest.approx(1.5)


# ---- summary ------------------------------------------------------------------------


def test_summarize_hand_computed_run() -> None:
    records = [
        rec(ttft=0.1, latency=0.5, out=5, itl=[0.1] * 4, prompt=100, start=0.0),
        rec(ttft=0.3, latency=1.1, out=9, itl=[0.1] * 8, prompt=300, start=0.4),
        rec(ok=False, ttft=None, latency=None, prompt=50, error="timeout (ReadTimeout)"),
    ]
    s = summarize(records, duration=2.0, slo=SLO(ttft_ms=200))
    assert (s["num_requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["total_input_tokens"] == 400  # completed requests only, as in vLLM
    assert s["total_output_tokens"] == 14
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 7.0
    assert s["total_token_throughput"] == 207.0
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)  # 100 + 0.99 * 200
    assert s["mean_tpot_ms"] == pytest.approx(100.0)
    assert s["mean_e2el_ms"] == pytest.approx(800.0)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["request_goodput"] == 0.5
    assert s["max_concurrent_requests"] == 2  # [0, 0.5] overlaps [0.4, 1.5]
    assert s["num_short_outputs"] == 0
    for key in ("mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p90_itl_ms", "p50_e2el_ms"):
        assert key in s


def test_summarize_all_failed_gives_none_not_zero() -> None:
    s = summarize([rec(ok=False, ttft=None, latency=None, error="x")], 1.0)
    assert s["completed"] == 0 and s["failed"] == 1
    assert s["mean_ttft_ms"] is None and s["p99_tpot_ms"] is None
    assert s["request_throughput"] == 0.0


def test_concurrency_and_peak_tokens() -> None:
    a = rec(ttft=0.1, latency=1.0, out=3, itl=[0.2, 0.2], start=0.0)
    b = rec(ttft=0.1, latency=0.5, out=2, itl=[0.1], start=0.2)
    c = rec(ttft=0.1, latency=0.2, out=1, start=1.0)  # starts when a ends: not overlapping
    assert max_concurrency([a, b, c]) == 2
    # token times: a 0.1, 0.3, 0.5; b 0.3, 0.4; c 1.1 -> 5 in second 0, 1 in second 1
    assert peak_output_tokens_per_s([a, b, c]) == 5.0


def test_send_lag_shows_a_load_generator_that_fell_behind() -> None:
    on_time = rec(start=1.003)
    on_time.scheduled_time = 1.0
    late = rec(start=6.86)
    late.scheduled_time = 5.04
    waited = rec(start=3.0)  # sent late only because --max-concurrency held it
    waited.scheduled_time, waited.queue_time = 1.0, 2.0
    closed_loop = rec(start=9.0)  # no arrival time: not counted
    s = summarize([on_time, late, waited, closed_loop], duration=10.0)
    assert s["late_sends"] == 1
    assert s["max_send_lag_ms"] == pytest.approx(1820.0)
    assert "late_sends" not in summarize([closed_loop], duration=10.0)
