"""The autoscaling signals: what each engine replica reports, and their pool-wide summary.

Replicas return :meth:`SignalWindow.snapshot` from ``record_autoscaling_stats()``; Ray
averages each key over ``look_back_period_s`` per replica and hands the policies
``ctx.aggregated_metrics[key][replica]``; :func:`prefill_signals` and :func:`decode_signals`
fold those into one view per pool. Everything comes from vLLM's own stat loggers (scheduler
and iteration stats) and the replica's request bookkeeping, never from logs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from autoscaling.sizing import DecodeSignals, PrefillSignals

# Keys a replica reports (all floats; Ray rejects anything else).
WAITING = "waiting"  # engine scheduler: requests waiting
RUNNING = "running"  # engine scheduler: requests running
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"  # accepted, not yet prefilled, after hits
ARRIVAL_TOKENS_PER_S = "arrival_prefill_tokens_per_s"
MEAN_PREFILL_TOKENS = "mean_prefill_tokens"  # uncached tokens per arriving prompt
KV_USAGE = "kv_usage"
CONTEXT_TOKENS = "mean_context_tokens"  # KV tokens held per running sequence
PROMPT_TOKENS_PER_S = "prompt_tokens_per_s"  # computed by the engine
GENERATION_TOKENS_PER_S = "generation_tokens_per_s"
TTFT_P50, TTFT_P90 = "ttft_p50_ms", "ttft_p90_ms"
ITL_P50, ITL_P90 = "itl_p50_ms", "itl_p90_ms"
TTFT_SAMPLES, ITL_SAMPLES = "ttft_samples", "itl_samples"


class SignalWindow:
    """Replica-side rolling window of latencies, arrivals and engine token rates."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window_s, self._clock = window_s, clock
        # Bounded: percentiles of the latest samples are enough, and snapshots stay cheap.
        self._ttft: deque[tuple[float, float]] = deque(maxlen=4096)
        self._itl: deque[tuple[float, float]] = deque(maxlen=4096)
        self._arrivals: deque[tuple[float, float]] = deque()
        self._totals: deque[tuple[float, float, float]] = deque()  # (t, prompt, gen) totals

    def observe_ttft(self, seconds: Iterable[float]) -> None:
        now = self._clock()
        self._ttft.extend((now, s * 1e3) for s in seconds)

    def observe_itl(self, seconds: Iterable[float]) -> None:
        now = self._clock()
        self._itl.extend((now, s * 1e3) for s in seconds)

    def observe_arrival(self, prefill_tokens: float) -> None:
        self._arrivals.append((self._clock(), max(prefill_tokens, 0.0)))

    def snapshot(self, engine: Mapping[str, Any], queued_prefill_tokens: float
                 ) -> dict[str, float]:
        """``engine``: :class:`app.engine_stats.EngineCounters` as a dict."""
        now = self._clock()
        cutoff = now - self.window_s
        for q in (self._ttft, self._itl, self._arrivals, self._totals):
            while q and q[0][0] < cutoff:
                q.popleft()
        self._totals.append((now, float(engine.get("prompt_tokens_computed", 0)),
                             float(engine.get("generation_tokens", 0))))
        t0, p0, g0 = self._totals[0]
        span = max(now - t0, 1e-9)
        arrived = [tok for _, tok in self._arrivals]
        arrival_span = max(min(self.window_s, now - self._arrivals[0][0]), 1.0) if arrived else 1
        running = float(engine.get("num_running_reqs", 0))
        kv_tokens = (engine.get("kv_cache_usage", 0.0) * engine.get("kv_num_blocks", 0)
                     * engine.get("kv_block_size", 0))
        ttft = sorted(v for _, v in self._ttft)
        itl = sorted(v for _, v in self._itl)
        return {
            WAITING: float(engine.get("num_waiting_reqs", 0)),
            RUNNING: running,
            QUEUED_PREFILL_TOKENS: float(queued_prefill_tokens),
            ARRIVAL_TOKENS_PER_S: sum(arrived) / arrival_span,
            MEAN_PREFILL_TOKENS: sum(arrived) / len(arrived) if arrived else 0.0,
            KV_USAGE: float(engine.get("kv_cache_usage", 0.0)),
            CONTEXT_TOKENS: kv_tokens / running if running else 0.0,
            PROMPT_TOKENS_PER_S: (self._totals[-1][1] - p0) / span if span > 1e-3 else 0.0,
            GENERATION_TOKENS_PER_S: (self._totals[-1][2] - g0) / span if span > 1e-3 else 0.0,
            TTFT_P50: percentile(ttft, 0.5), TTFT_P90: percentile(ttft, 0.9),
            ITL_P50: percentile(itl, 0.5), ITL_P90: percentile(itl, 0.9),
            TTFT_SAMPLES: float(len(ttft)), ITL_SAMPLES: float(len(itl)),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no samples (``*_samples`` says whether there were)."""
    if not sorted_values:
        return 0.0
    i = min(int(q * len(sorted_values)), len(sorted_values) - 1)
    return sorted_values[i]


# --- pool view (policy side) --------------------------------------------------------------------

Metrics = Mapping[str, Mapping[Any, float]]  # key -> replica -> window mean


def _sum(m: Metrics, key: str) -> float:
    return float(sum(m.get(key, {}).values()))


def _mean(m: Metrics, key: str) -> float:
    vals = list(m.get(key, {}).values())
    return float(sum(vals) / len(vals)) if vals else 0.0


def _weighted_mean(m: Metrics, key: str, weight_key: str) -> float:
    weights = m.get(weight_key, {})
    total = sum(weights.get(r, 0.0) for r in m.get(key, {}))
    if total <= 0:
        return 0.0
    return float(sum(v * weights.get(r, 0.0) for r, v in m.get(key, {}).items()) / total)


def _observed_p90(m: Metrics, key: str, samples_key: str) -> float | None:
    """The worst replica's p90 among replicas that saw requests; None if none did."""
    counts = m.get(samples_key, {})
    vals = [v for r, v in m.get(key, {}).items() if counts.get(r, 0) > 0]
    return max(vals) if vals else None


def prefill_signals(m: Metrics) -> PrefillSignals:
    arrivals = m.get(ARRIVAL_TOKENS_PER_S, {})
    means = [v for r, v in m.get(MEAN_PREFILL_TOKENS, {}).items() if arrivals.get(r, 0) > 0]
    return PrefillSignals(
        queued_tokens=_sum(m, QUEUED_PREFILL_TOKENS),
        arrival_tokens_per_s=_sum(m, ARRIVAL_TOKENS_PER_S),
        mean_prompt_tokens=sum(means) / len(means) if means else 0.0,
        ttft_p90_ms=_observed_p90(m, TTFT_P90, TTFT_SAMPLES),
    )


def decode_signals(m: Metrics) -> DecodeSignals:
    return DecodeSignals(
        sequences=_sum(m, RUNNING) + _sum(m, WAITING),
        generation_tokens_per_s=_sum(m, GENERATION_TOKENS_PER_S),
        mean_context_tokens=_weighted_mean(m, CONTEXT_TOKENS, RUNNING),
        kv_usage=_mean(m, KV_USAGE),
        itl_p90_ms=_observed_p90(m, ITL_P90, ITL_SAMPLES),
    )
