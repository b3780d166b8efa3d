"""Simulated requests and the traces they come from.

A trace gives arrival times and prompt/output lengths only; the simulation fills in when each
request got its first token and finished. Traces are read in place with
:mod:`loadtests.traces` (never copied into the repository) and can be time-compressed
(``compress=10``: ten times the rate, a tenth of the duration: the trace's own burstiness at a
higher load) or cut to their busiest window.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from loadtests.traces import TRACE_FILES, read_trace, resolve_traces_dir, trace_path

NAN = math.nan


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request; the ``*_t`` fields are simulated times in seconds (NaN until reached)."""

    id: int
    arrival: float
    prompt: int
    output: int
    prefill_done_t: float = NAN  # prompt computed (prefill replica, or the aggregated one)
    first_token_t: float = NAN
    finished_t: float = NAN

    @property
    def done(self) -> bool:
        return not math.isnan(self.finished_t)

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_t - self.arrival) * 1e3

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first (0 for one-token outputs)."""
        if self.output <= 1:
            return 0.0
        return (self.finished_t - self.first_token_t) * 1e3 / (self.output - 1)

    @property
    def e2e_ms(self) -> float:
        return (self.finished_t - self.arrival) * 1e3


def make_requests(rows: list[tuple[float, int, int]]) -> list[SimRequest]:
    """``(arrival s, prompt tokens, output tokens)`` rows, sorted by arrival."""
    rows = sorted(rows, key=lambda r: r[0])
    return [SimRequest(i, float(t), max(int(p), 1), max(int(o), 1))
            for i, (t, p, o) in enumerate(rows)]


def peak_window(times: list[float], window_s: float) -> tuple[float, float]:
    """The ``window_s``-long interval holding the most arrivals (``times`` sorted)."""
    best, best_start = 0, times[0] if times else 0.0
    for i, t in enumerate(times):
        n = bisect_right(times, t + window_s) - i
        if n > best:
            best, best_start = n, t
    return best_start, best_start + window_s


def load_trace(spec: str, traces_dir: str | Path | None = None, compress: float = 1.0,
               peak_window_s: float | None = None, max_requests: int | None = None,
               max_prompt: int | None = None) -> list[SimRequest]:
    """``spec``: ``azure:conv``, ``azure:code``, ``mooncake`` or a path to such a file.

    Order of operations: cut to the busiest ``peak_window_s`` (in trace time), then divide
    times by ``compress``, then keep the first ``max_requests``. ``max_prompt`` clips prompt
    lengths (a model's context limit).
    """
    if compress <= 0:
        raise ValueError("compress must be > 0")
    base = resolve_traces_dir(traces_dir)
    path = trace_path(spec, None, base) if spec in TRACE_FILES else Path(spec)
    records = read_trace(path)
    times = [r.timestamp for r in records]
    if peak_window_s:
        lo, hi = peak_window(times, peak_window_s)
        records = [r for r in records if lo <= r.timestamp <= hi]
    t0 = records[0].timestamp if records else 0.0
    rows = [((r.timestamp - t0) / compress,
             min(r.input_len, max_prompt) if max_prompt else r.input_len, r.output_len)
            for r in records]
    if max_requests is not None:
        rows = rows[:max_requests]
    return make_requests(rows)
