"""The metric specs as Ray metrics, and the recorders the replicas call.

Ray's metrics agent serves them in Prometheus format on each node's metrics export port.
Metrics are created lazily (first use, inside a replica: ``ray.serve.metrics`` then adds the
``deployment``/``replica``/``application`` labels), so importing this module needs no Ray
worker. A metric that fails to record is logged once and never reaches the request or vLLM's
output loop.

Cost: the ingress records 3-5 values per request (~10 µs each, measured in
docs/OBSERVABILITY.md), after the response is sent (a whole response: Starlette's background
task; a stream: when it ends) or on the event loop's next turn (prefill leg, fallback,
migration), never between the request and its answer; per streamed token it only reads the
clock and checks the chunk's prefix, with no lock. Engine counters are summed locally and
pushed at most every ``GaugeThrottle.interval_s`` (and when the engine goes idle).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from app.metrics.definitions import ENGINE, FRONT, MetricSpec
from app.metrics.math import (
    NO_ROUTE,
    GaugeThrottle,
    StreamClock,
    TransferTotals,
    status_label,
    stream_label,
)

log = logging.getLogger("ray.serve")


def build(spec: MetricSpec) -> Any:
    from ray.serve.metrics import Counter, Gauge, Histogram

    if spec.kind == "counter":
        return Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    return Histogram(spec.name, description=spec.description, tag_keys=spec.tags,
                     boundaries=list(spec.boundaries))


@functools.cache
def front_metrics() -> dict[str, Any]:
    return {key: build(spec) for key, spec in FRONT.items()}


@functools.cache
def engine_metrics() -> dict[str, Any]:
    return {key: build(spec) for key, spec in ENGINE.items()}


_warned: set[str] = set()


def _soon(fn: Any, *args: Any) -> None:
    """Run ``fn`` on the event loop's next turn (now, outside one)."""
    try:
        asyncio.get_running_loop().call_soon(fn, *args)
    except RuntimeError:
        fn(*args)


def _failed(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.exception("recording metric %s failed (further failures not logged)", what)


class FrontMetrics:
    """What the HTTP front records, as the client sees it; also the orchestrator's and
    migrator's :class:`app.metrics.observer.FlowObserver`."""

    def __init__(self, phase: str):
        self.phase = phase
        self.m = front_metrics()
        self._tags: dict[tuple, dict[str, str]] = {}

    def _t(self, *pairs: str) -> dict[str, str]:
        """A tag dict per label combination, built once (a handful of combinations)."""
        tags = self._tags.get(pairs)
        if tags is None:
            tags = {"phase": self.phase, **dict(zip(pairs[::2], pairs[1::2], strict=True))}
            self._tags[pairs] = tags
        return tags

    # --- FlowObserver: recorded on the event loop's next turn, off the request's path ----

    def prefill_leg(self, outcome: str, seconds: float) -> None:
        _soon(self._prefill_leg, outcome, seconds)

    def fallback(self, reason: str) -> None:
        _soon(self._inc, "fallbacks", "reason", reason)

    def migration(self, outcome: str) -> None:
        _soon(self._inc, "migrations", "outcome", outcome)

    def token_one(self, source: str) -> None:
        _soon(self._inc, "token_one", "source", source)

    def _prefill_leg(self, outcome: str, seconds: float) -> None:
        try:
            self.m["prefill_leg"].observe(seconds, tags={"phase": "prefill",
                                                         "outcome": outcome})
        except Exception:  # noqa: BLE001 - see module docstring
            _failed("pd_prefill_leg_seconds")

    def _inc(self, key: str, label: str, value: str) -> None:
        try:
            self.m[key].inc(tags=self._t(label, value))
        except Exception:  # noqa: BLE001
            _failed(key)

    # --- requests -------------------------------------------------------------------------

    def answered(self, start_s: float, status: int, route: str = NO_ROUTE,
                 stream: bool = False, end_s: float | None = None) -> None:
        """A whole (non-streamed) response: TTFT is the time to it, as for the client.
        ``end_s``: when it was ready (default: now); the ingress records after sending."""
        try:
            elapsed = (end_s if end_s is not None else time.perf_counter()) - start_s
            s = stream_label(stream)
            self.m["requests"].inc(tags=self._t("route", route, "stream", s,
                                                "status", status_label(status)))
            if status < 400:
                tags = self._t("route", route, "stream", s)
                self.m["ttft"].observe(elapsed, tags=tags)
                self.m["e2e"].observe(elapsed, tags=tags)
        except Exception:  # noqa: BLE001
            _failed("pd_requests_total")

    async def answered_async(self, *args: Any) -> None:
        """:meth:`answered` as a coroutine: Starlette runs a sync background task in a
        thread."""
        self.answered(*args)

    def stream(self, chunks: AsyncIterator[str], start_s: float, route: str
               ) -> AsyncIterator[str]:
        return self._timed(chunks, StreamClock(start_s), route)

    async def _timed(self, chunks: AsyncIterator[str], clock: StreamClock, route: str
                     ) -> AsyncIterator[str]:
        now = time.perf_counter
        try:
            async for chunk in chunks:
                clock.observe(chunk, now())
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            self._streamed(clock, route)

    def _streamed(self, clock: StreamClock, route: str) -> None:
        try:
            self.m["requests"].inc(tags=self._t("route", route, "stream", "true",
                                                "status", "200"))
            tags = self._t("route", route, "stream", "true")
            ttft = clock.ttft_s()
            if ttft is not None:
                self.m["ttft"].observe(ttft, tags=tags)
            tpot = clock.tpot_s()
            if tpot is not None:
                self.m["tpot"].observe(tpot, tags=self._t("route", route))
            self.m["e2e"].observe(time.perf_counter() - clock.start_s, tags=tags)
        except Exception:  # noqa: BLE001
            _failed("pd_ttft_seconds")


class EngineMetrics:
    """What an engine replica records from vLLM's per-step stats (``app.engine_stats``)."""

    _COUNTERS = ("finished", "generation_tokens", "cache_queries", "cache_hits", "kv_bytes",
                 "kv_transfers", "kv_failures")
    _SOURCES = ("computed", "local_cache_hit", "external_kv_transfer")

    def __init__(self, phase: str, interval_s: float = 0.25):
        self.phase = phase
        self.m = engine_metrics()
        self.tags = {"phase": phase}
        self._source_tags = {s: {"phase": phase, "source": s} for s in self._SOURCES}
        self.throttle = GaugeThrottle(interval_s)
        self.pending: dict[str, float] = dict.fromkeys(self._COUNTERS + self._SOURCES, 0)
        self._flushed_s = -math.inf  # the first step flushes, however young the clock

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               transfers: TransferTotals | None) -> None:
        """One engine step. Never raises (it runs inside vLLM's output loop)."""
        try:
            self._record(scheduler_stats, iteration_stats, transfers)
        except Exception:  # noqa: BLE001 - an exception here would kill the engine
            _failed("engine metrics")

    def _record(self, scheduler_stats: Any, iteration_stats: Any,
                transfers: TransferTotals | None) -> None:
        p, m, tags = self.pending, self.m, self.tags
        if transfers is not None:
            p["kv_transfers"] += transfers.transfers
            p["kv_bytes"] += transfers.bytes
            p["kv_failures"] += transfers.failures
            for d in transfers.durations_s:
                m["kv_seconds"].observe(d, tags=tags)
        if iteration_stats is not None:
            prompt = iteration_stats.prompt_token_stats
            p["computed"] += prompt.computed
            p["local_cache_hit"] += prompt.local_cache_hit
            p["external_kv_transfer"] += prompt.external_kv_transfer
            p["generation_tokens"] += iteration_stats.num_generation_tokens
            for ttft in iteration_stats.time_to_first_tokens_iter or ():
                m["ttft"].observe(ttft, tags=tags)
            for done in iteration_stats.finished_requests or ():
                p["finished"] += 1
                if getattr(done, "num_generation_tokens", 0) > 1:
                    tpot = getattr(done, "mean_time_per_output_token", 0.0)
                    if tpot > 0:
                        m["tpot"].observe(tpot, tags=tags)
                queued = getattr(done, "queued_time", 0.0)
                if queued > 0:
                    m["queue"].observe(queued, tags=tags)
        gauges = None
        if scheduler_stats is not None:
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                p["cache_queries"] += prefix.queries
                p["cache_hits"] += prefix.hits
            gauges = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                      round(scheduler_stats.kv_cache_usage, 4))
        now = time.monotonic()
        idle = gauges is not None and gauges[0] == 0 and gauges[1] == 0
        if gauges is not None and self.throttle.due(now, gauges, idle):
            m["running"].set(gauges[0], tags=tags)
            m["waiting"].set(gauges[1], tags=tags)
            m["kv_usage"].set(gauges[2], tags=tags)
        if idle or now - self._flushed_s >= self.throttle.interval_s:
            self._flushed_s = now
            self.flush()

    def refresh(self) -> None:
        """Re-push the last gauge values. Ray drops a gauge series that has not been set for
        two report intervals, and an idle engine has no steps to set it: the replica calls
        this every second. Never raises."""
        try:
            last = self.throttle.last
            if last is not None:
                for key, value in zip(("running", "waiting", "kv_usage"), last, strict=True):
                    self.m[key].set(value, tags=self.tags)
            self.flush()
        except Exception:  # noqa: BLE001
            _failed("engine gauges")

    def flush(self) -> None:
        """Push the counters summed since the last push."""
        p, m = self.pending, self.m
        for key in self._COUNTERS:
            if p[key] > 0:
                m[key].inc(p[key], tags=self.tags)
                p[key] = 0
        for source in self._SOURCES:
            if p[source] > 0:
                m["prompt_tokens"].inc(p[source], tags=self._source_tags[source])
                p[source] = 0
