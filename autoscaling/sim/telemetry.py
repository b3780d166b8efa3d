"""A simulated replica's autoscaling signals, produced and averaged the way production does.

Replica side: the production :class:`autoscaling.signals.SignalWindow` (same keys, same
rolling window, driven by the simulation clock) builds each snapshot. The one exception is
the inter-token latency: vLLM reports one ITL sample per running sequence per step, i.e.
hundreds per step on a big batch; here each step is one *weighted* sample, which gives the
same nearest-rank percentiles without materialising every token.

Ray side: Ray averages each reported key over ``look_back_period_s`` per replica before a
policy sees it (``ctx.aggregated_metrics[key][replica]``); :meth:`ReplicaTelemetry.means`
returns that window mean from running sums, so a tick costs O(keys) per replica.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from autoscaling import signals as sig

ONGOING = "ongoing_requests"  # Ray's own per-replica metric, for the Ray-default baseline


def weighted_percentile(samples: list[tuple[float, int]], q: float) -> float:
    """Nearest-rank percentile of ``(value, count)`` samples, matching
    :func:`autoscaling.signals.percentile` on the expanded list."""
    total = sum(n for _, n in samples)
    if total <= 0:
        return 0.0
    rank = min(int(q * total), total - 1)
    seen = 0
    for value, n in sorted(samples):
        seen += n
        if seen > rank:
            return value
    return samples[-1][0]  # unreachable: ranks are < total


class ReplicaTelemetry:
    def __init__(self, clock: Callable[[], float], look_back_s: float):
        self._clock = clock
        self.look_back_s = look_back_s
        self.window = sig.SignalWindow(clock=clock)  # production window length
        self._itl: deque[tuple[float, float, int]] = deque()  # (t, step ms, tokens)
        self._history: deque[tuple[float, dict[str, float]]] = deque()
        self._sums: dict[str, float] = {}

    # --- replica side ---------------------------------------------------------------------

    def observe_ttft(self, seconds: float) -> None:
        self.window.observe_ttft((seconds,))

    def observe_arrival(self, prefill_tokens: float) -> None:
        self.window.observe_arrival(prefill_tokens)

    def observe_itl_step(self, step_ms: float, tokens: int) -> None:
        if tokens > 0:
            self._itl.append((self._clock(), step_ms, tokens))

    def record(self, engine: Mapping[str, float], queued_prefill_tokens: float,
               ongoing: float) -> dict[str, float]:
        """Take one snapshot (what ``record_autoscaling_stats()`` returns) and keep it for
        the look-back mean; returns the snapshot."""
        now = self._clock()
        snap = self.window.snapshot(engine, queued_prefill_tokens)
        cutoff = now - self.window.window_s
        while self._itl and self._itl[0][0] < cutoff:
            self._itl.popleft()
        steps = [(ms, n) for _, ms, n in self._itl]
        snap[sig.ITL_P50] = weighted_percentile(steps, 0.5)
        snap[sig.ITL_P90] = weighted_percentile(steps, 0.9)
        snap[sig.ITL_SAMPLES] = float(sum(n for _, n in steps))
        snap[ONGOING] = float(ongoing)
        self._history.append((now, snap))
        sums = self._sums
        for k, v in snap.items():
            sums[k] = sums.get(k, 0.0) + v
        self._expire(now)
        return snap

    # --- Ray side -------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        cutoff = now - self.look_back_s
        sums = self._sums
        while self._history and self._history[0][0] <= cutoff:
            _, old = self._history.popleft()
            for k, v in old.items():
                sums[k] -= v

    def means(self) -> dict[str, float]:
        """Each key's mean over the snapshots of the last ``look_back_s`` (empty if none)."""
        self._expire(self._clock())
        n = len(self._history)
        if not n:
            return {}
        return {k: v / n for k, v in self._sums.items()}
