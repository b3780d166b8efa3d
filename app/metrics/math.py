"""Pure metric math: what a stream's timings say, which labels a request gets, what NIXL moved.

No Ray and no vLLM import, so every rule is unit-tested in microseconds; the Ray side
(:mod:`app.metrics.ray_metrics`) only records what these functions compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PHASES = ("prefill", "decode", "aggregated")
NO_ROUTE = "none"  # a request answered before any route was chosen (bad input, 503)

_DONE = "data: [DONE]"
_USAGE_ONLY = '"choices":[]'  # the final usage chunk of a stream: no token in it
_ROLE = '"role":'  # the first chat chunk: the assistant role, sent with the first token


def phase_label(role: str) -> str:
    """The ``phase`` label of an engine replica's metrics: its role, or ``aggregated``."""
    return role if role in PHASES else "aggregated"


def status_label(status: int) -> str:
    """HTTP status as a label: the exact code (a handful of values: 200, 400, 404, 503...)."""
    return str(int(status))


def stream_label(stream: bool) -> str:
    return "true" if stream else "false"


def is_token_event(chunk: str, first: bool = False) -> bool:
    """Whether one SSE event of an OpenAI stream carries generated tokens.

    ``[DONE]`` and the usage-only chunk (``"choices":[]``) do not; neither does the chat
    role chunk, the first event of a chat stream, which vLLM sends together with the first
    token's chunk (``first``: only the first event is checked for it, once per stream).
    """
    if chunk.startswith(_DONE) or _USAGE_ONLY in chunk:
        return False
    return not (first and _ROLE in chunk and '"content":""' in chunk)


def tpot_seconds(first_token_s: float, last_token_s: float, token_events: int) -> float | None:
    """Time per output token after the first: (last - first) / (events - 1); None below two
    token events (nothing to average). One event per engine step: one token per event, unless
    the engine emits several per step (speculative decoding), then it is per event."""
    if token_events < 2 or last_token_s < first_token_s:
        return None
    return (last_token_s - first_token_s) / (token_events - 1)


def inter_token_latencies(timestamps: Sequence[float]) -> list[float]:
    """Gaps between consecutive token timestamps (ITL), for tests and offline analysis."""
    return [b - a for a, b in zip(timestamps, timestamps[1:], strict=False)]


@dataclass
class StreamClock:
    """Per-stream timing kept by the ingress: three floats and a counter, no per-token list,
    no lock (one stream is one coroutine)."""

    start_s: float
    first_s: float | None = None  # first event of the stream (TTFT as the client sees it)
    first_token_s: float | None = None
    last_token_s: float | None = None
    token_events: int = 0
    events: int = 0

    def observe(self, chunk: str, now_s: float) -> None:
        first = self.events == 0
        self.events += 1
        if first:
            self.first_s = now_s
        if is_token_event(chunk, first):
            if self.first_token_s is None:
                self.first_token_s = now_s
            self.last_token_s = now_s
            self.token_events += 1

    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.start_s

    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.last_token_s is None:
            return None
        return tpot_seconds(self.first_token_s, self.last_token_s, self.token_events)


@dataclass
class TransferTotals:
    """What one batch of NIXL connector stats says was moved."""

    transfers: int = 0
    bytes: int = 0
    failures: int = 0
    durations_s: list[float] = field(default_factory=list)

    def add(self, other: TransferTotals) -> None:
        self.transfers += other.transfers
        self.bytes += other.bytes
        self.failures += other.failures
        self.durations_s.extend(other.durations_s)


def fold_transfer_stats(stats: Any, into: TransferTotals | None = None) -> TransferTotals:
    """Fold vLLM's KV-connector stats (NIXL: per-transfer lists ``transfer_duration``,
    ``bytes_transferred``, ``num_failed_transfers``, possibly nested per connector and
    wrapped in objects with ``.data``) into totals."""
    totals = into if into is not None else TransferTotals()
    if not isinstance(stats, dict):
        stats = getattr(stats, "data", None)
        if not isinstance(stats, dict):
            return totals
    for key, value in stats.items():
        if isinstance(value, dict) or hasattr(value, "data"):
            fold_transfer_stats(value, totals)
        elif isinstance(value, list):
            if key == "transfer_duration":
                totals.transfers += len(value)
                totals.durations_s.extend(float(v) for v in value if _finite(v))
            elif key == "bytes_transferred":
                totals.bytes += int(sum(value))
            elif key == "num_failed_transfers":
                totals.failures += int(sum(value))
    return totals


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v)) and float(v) >= 0
    except (TypeError, ValueError):
        return False


@dataclass
class GaugeThrottle:
    """When to push engine gauges (queue, KV usage) from vLLM's per-step stats: on a change,
    at most every ``interval_s``, except that a return to idle is pushed at once (the last
    value before the engine goes quiet must not be a busy one)."""

    interval_s: float = 0.25
    last_s: float = -math.inf
    last: tuple | None = None

    def due(self, now_s: float, values: tuple, idle: bool) -> bool:
        if values == self.last:
            return False
        if not idle and now_s - self.last_s < self.interval_s:
            return False
        self.last, self.last_s = values, now_s
        return True


def prefill_outcome(timed_out: bool = False, failed: bool = False, status: int | None = None,
                    has_params: bool = True) -> str:
    """The prefill leg's outcome label: ``ok``, ``timeout``, ``error`` (raised), ``client_error``
    (4xx, returned to the client), ``server_error`` (non-4xx answer) or ``no_params``."""
    if timed_out:
        return "timeout"
    if failed:
        return "error"
    if status is not None and status >= 400:
        return "client_error" if 400 <= status < 500 else "server_error"
    return "ok" if has_params else "no_params"


FALLBACK_OUTCOMES = frozenset({"timeout", "error", "server_error", "no_params"})


def counter_delta(previous: float, current: float) -> float:
    """Increment for a Prometheus counter mirroring a running total (a reset counts from 0)."""
    return current - previous if current >= previous else current


def quantile_from_buckets(bounds: Sequence[float], cumulative: Sequence[float],
                          q: float) -> float | None:
    """Prometheus' ``histogram_quantile`` over one histogram's cumulative bucket counts
    (``bounds`` without +Inf, ``cumulative`` with it last): linear within the bucket."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=False):
        if count >= rank:
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1] if bounds else None

