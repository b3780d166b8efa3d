"""Latency metrics, SLO attainment and goodput: pure math over per-request records.

Definitions (same as ``vllm bench serve`` so numbers are comparable):

- TTFT: send -> first streamed chunk carrying a choice.
- ITL: gaps between consecutive streamed chunks after the first (one value per gap).
- TPOT: ``(latency - ttft) / (output_len - 1)``, the first token excluded; only requests with
  more than one output token contribute to TPOT statistics. For SLO checks a request with
  one output token has TPOT 0, as in vLLM.
- E2E latency: send -> last streamed chunk.
- Percentiles interpolate linearly between order statistics (``numpy.percentile``'s default).

Failed requests are never dropped: they count in ``failed``, and as SLO misses in every
attainment and goodput figure, so a server cannot look better by erroring out.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 99)


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds, relative to the run's start."""

    request_id: str
    prompt_len: int
    output_len_requested: int
    scheduled_time: float | None = None  # when the arrival process released it (open loop)
    start_time: float = 0.0  # when it was sent
    queue_time: float = 0.0  # waited for a --max-concurrency slot
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    output_len: int = 0
    success: bool = False
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; ``None`` without a second token."""
        return tpot(self.latency, self.ttft, self.output_len) if self.success else None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["tpot"] = self.tpot
        return row


def tpot(latency: float | None, ttft: float | None, output_len: int) -> float | None:
    """``(latency - ttft) / (output_len - 1)``: decode speed, excluding the first token."""
    if latency is None or ttft is None or output_len <= 1:
        return None
    return (latency - ttft) / (output_len - 1)


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; unset limits are not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """``"ttft=500,tpot=50"`` (ms); also accepts ``e2el``."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower().removesuffix("_ms")
            if not sep or key not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"bad SLO item {item!r}: use ttft=MS,tpot=MS[,e2el=MS]")
            values[f"{key}_ms"] = float(value)
        return cls(**values)

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met(self, record: RequestRecord) -> bool:
        """A failed request misses every SLO; a one-token output has TPOT 0."""
        if not record.success:
            return False
        if self.ttft_ms is not None and (record.ttft is None or record.ttft * 1e3 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and (record.tpot or 0.0) * 1e3 > self.tpot_ms:
            return False
        return self.e2el_ms is None or (
            record.latency is not None and record.latency * 1e3 <= self.e2el_ms
        )

    def only(self, metric: str) -> SLO:
        """This SLO restricted to one metric (for per-metric attainment)."""
        return SLO(**{f"{metric}_ms": getattr(self, f"{metric}_ms")})

    def describe(self) -> str:
        parts = [
            f"{name} <= {value:g} ms"
            for name, value in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms),
                                ("E2E", self.e2el_ms))
            if value is not None
        ]
        return ", ".join(parts) if parts else "none"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); ``None`` for no values."""
    if not 0 <= p <= 100:
        raise ValueError("percentile must be in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentile_key(p: float) -> str:
    """``99 -> "p99"``, ``99.9 -> "p99.9"`` (vLLM's naming)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def describe(values: Sequence[float], percentiles: Iterable[float]) -> dict[str, float | None]:
    """mean, median, population std and percentiles of ``values`` (None when empty)."""
    out: dict[str, float | None] = {}
    if values:
        mean = sum(values) / len(values)
        out["mean"] = mean
        out["median"] = percentile(values, 50)
        out["std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    else:
        out["mean"] = out["median"] = out["std"] = None
    for p in percentiles:
        out[percentile_key(p)] = percentile(values, p)
    return out


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float | None:
    """Share of *all* requests (failures included) meeting every limit of ``slo``."""
    if not records or not slo.is_set:
        return None
    return sum(slo.met(r) for r in records) / len(records)


def request_goodput(records: Sequence[RequestRecord], slo: SLO, duration: float) -> float | None:
    """vLLM-style goodput: requests meeting all SLOs per second of the run."""
    if not slo.is_set or duration <= 0:
        return None
    return sum(slo.met(r) for r in records) / duration


@dataclass(frozen=True)
class SweepGoodput:
    """DistServe-style goodput from a rate sweep.

    ``goodput``: the highest swept rate such that every swept rate up to it reaches the
    target attainment (0 when even the lowest misses). ``interpolated``: linear estimate of
    where attainment crosses the target between the last passing and the first failing rate.
    ``status``: ``ok`` (crossing bracketed), ``all_pass`` (goodput is a lower bound: sweep
    higher), ``none_pass`` (below the lowest rate: sweep lower), ``empty``.
    """

    goodput: float
    interpolated: float | None
    status: Literal["ok", "all_pass", "none_pass", "empty"]
    target: float


def distserve_goodput(
    points: Iterable[tuple[float, float | None]], target: float = 0.9
) -> SweepGoodput:
    """``points``: (offered rate, attainment) pairs; attainment None counts as 0."""
    ordered = sorted((rate, att or 0.0) for rate, att in points)
    if not ordered:
        return SweepGoodput(0.0, None, "empty", target)
    last_pass: tuple[float, float] | None = None
    for rate, att in ordered:
        if att >= target:
            last_pass = (rate, att)
            continue
        if last_pass is None:
            return SweepGoodput(0.0, None, "none_pass", target)
        (r1, a1), (r2, a2) = last_pass, (rate, att)
        crossing = r1 + (a1 - target) / (a1 - a2) * (r2 - r1)
        return SweepGoodput(r1, crossing, "ok", target)
    assert last_pass is not None
    return SweepGoodput(last_pass[0], last_pass[0], "all_pass", target)


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_HTTP_PREFIX = re.compile(r"^HTTP \d{3}: ")


def error_kind(message: str) -> str:
    """Group errors that differ only in numbers (token counts, ids): ``HTTP 400: prompt has
    2285 tokens`` -> ``HTTP 400: prompt has N tokens``; the status code is kept."""
    if not message:
        return "unknown error"
    prefix = m.group(0) if (m := _HTTP_PREFIX.match(message)) else ""
    return prefix + _NUMBER.sub("N", message[len(prefix):])


def max_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (between send and last chunk)."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.success and r.latency is not None:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.latency, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at equal times
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def peak_output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """Most streamed chunks in any one-second bucket (vLLM's ``max_output_tokens_per_s``)."""
    ok = [r for r in records if r.success and r.ttft is not None]
    if not ok:
        return 0.0
    t0 = min(r.start_time for r in ok)
    buckets: Counter[int] = Counter()
    for r in ok:
        assert r.ttft is not None
        t = r.start_time + r.ttft
        buckets[int(t - t0)] += 1
        for gap in r.itl:
            t += gap
            buckets[int(t - t0)] += 1
    return float(max(buckets.values()))


LATE_SEND_S = 0.1  # a send this much after its arrival time means the client fell behind


def send_lags(records: Sequence[RequestRecord]) -> list[float]:
    """Seconds each open-loop request was sent after its arrival time, not counting a wait
    for a ``--max-concurrency`` slot. Above a few ms the load generator itself fell behind
    (starved of CPU on a shared machine, measured: up to 2.9 s on 2 cores): the arrivals
    were burstier than asked, and its reads of the streams were late too."""
    return [max(r.start_time - r.scheduled_time - r.queue_time, 0.0)
            for r in records if r.scheduled_time is not None]


def summarize(
    records: Sequence[RequestRecord],
    duration: float,
    slo: SLO | None = None,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """Run summary with ``vllm bench serve`` field names where they overlap (``completed``,
    ``request_throughput``, ``mean_ttft_ms``, ``p99_tpot_ms``, ...)."""
    slo = slo or SLO()
    percentiles = tuple(percentiles)
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok if r.latency is not None]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)

    out: dict[str, Any] = {
        "duration": duration,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": rate(len(ok)),
        "request_goodput": request_goodput(records, slo, duration),
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
        "max_output_tokens_per_s": peak_output_tokens_per_s(records),
        "max_concurrent_requests": max_concurrency(records),
        "num_short_outputs": sum(1 for r in ok if r.output_len < r.output_len_requested),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for stat, value in describe(values, percentiles).items():
            out[f"{stat}_{name}_ms"] = None if value is None else value * 1e3
    out["slo"] = {k: v for k, v in asdict(slo).items() if v is not None}
    out["slo_attainment"] = attainment(records, slo)
    for metric in ("ttft", "tpot", "e2el"):
        if getattr(slo, f"{metric}_ms") is not None:
            out[f"{metric}_attainment"] = attainment(records, slo.only(metric))
    out["error_counts"] = dict(Counter(error_kind(r.error) for r in failed).most_common())
    lags = send_lags(records)
    if lags:
        out["max_send_lag_ms"] = max(lags) * 1e3
        out["late_sends"] = sum(1 for lag in lags if lag > LATE_SEND_S)
    return out
