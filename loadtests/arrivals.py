"""Arrival schedules: send offsets (seconds from the start) for open-loop load.

Schedules are computed before the run, so a run's offered load is fixed by (spec, rate,
seed) and does not depend on how fast the server answers. Closed loop has no schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from loadtests.spec import ArrivalSpec


def gamma_offsets(n: int, rate: float, shape: float, rng: random.Random) -> list[float]:
    """Offsets with gamma-distributed gaps of mean ``1/rate`` (shape 1 = Poisson process).

    Same model as ``vllm bench serve --burstiness``: the first request goes at 0, and gaps
    have coefficient of variation ``1/sqrt(shape)``. ``rate = inf`` sends everything at 0.
    """
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or shape <= 0:
        raise ValueError("rate and shape must be positive")
    scale = 1.0 / (rate * shape)
    out = [0.0]
    for _ in range(n - 1):
        out.append(out[-1] + rng.gammavariate(shape, scale))
    return out


def trace_offsets(timestamps: Sequence[float], rate: float | None = None) -> list[float]:
    """Trace arrival times rebased to 0; with ``rate``, stretched so the mean rate
    ``(n - 1) / span`` equals it (keeps the trace's burst pattern at another load)."""
    if not timestamps:
        return []
    t0 = timestamps[0]
    offsets = [t - t0 for t in timestamps]
    if rate is None:
        return offsets
    if math.isinf(rate):
        return [0.0] * len(offsets)
    span = offsets[-1]
    if span <= 0 or len(offsets) < 2:
        return offsets
    factor = (len(offsets) - 1) / span / rate
    return [t * factor for t in offsets]


def arrival_offsets(
    arrival: ArrivalSpec,
    n: int,
    rate: float | None,
    timestamps: Sequence[float | None],
    seed: int | str,
) -> list[float] | None:
    """Send offsets for ``n`` requests, or ``None`` for closed loop."""
    if arrival.kind == "closed":
        return None
    if arrival.kind == "trace":
        if any(t is None for t in timestamps):
            raise ValueError("trace arrivals need a trace workload (azure or mooncake)")
        return trace_offsets([t for t in timestamps if t is not None], rate)
    if rate is None:
        raise ValueError(f"{arrival.kind} arrivals need --rate")
    return gamma_offsets(n, rate, arrival.shape, random.Random(f"loadtests-arrivals:{seed}"))
