"""Read Prometheus text exposition (what Ray's metrics export port serves): pure, for the
integration test and ``bench/metrics_snapshot.py``."""

from __future__ import annotations

import re
from collections import defaultdict

Sample = tuple[dict[str, str], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[Sample]]:
    """Sample name -> [(labels, value)], e.g. ``ray_pd_ttft_seconds_bucket``."""
    out: dict[str, list[Sample]] = defaultdict(list)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if m is None:
            continue
        name, _, labels, value = m.group(1), m.group(2), m.group(3), m.group(4)
        try:
            v = float(value)
        except ValueError:
            continue
        parsed = {k: _unescape(val) for k, val in _LABEL.findall(labels or "")}
        out[name].append((parsed, v))
    return dict(out)


def _unescape(value: str) -> str:
    return value.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")


def total(samples: dict[str, list[Sample]], name: str, **match: str) -> float:
    """Sum of ``name``'s samples whose labels include ``match``."""
    return sum(v for labels, v in samples.get(name, [])
               if all(labels.get(k) == want for k, want in match.items()))


def by_label(samples: dict[str, list[Sample]], name: str, label: str,
             **match: str) -> dict[str, float]:
    """``name``'s samples summed per value of ``label``."""
    out: dict[str, float] = defaultdict(float)
    for labels, v in samples.get(name, []):
        if all(labels.get(k) == want for k, want in match.items()):
            out[labels.get(label, "")] += v
    return dict(out)


def buckets(samples: dict[str, list[Sample]], name: str,
            **match: str) -> tuple[list[float], list[float]]:
    """A histogram's bucket bounds (without +Inf) and cumulative counts (with +Inf last),
    summed over the series matching ``match``."""
    per_le: dict[float, float] = defaultdict(float)
    for labels, v in samples.get(f"{name}_bucket", []):
        if all(labels.get(k) == want for k, want in match.items()) and "le" in labels:
            per_le[float(labels["le"])] += v
    les = sorted(per_le)
    return [b for b in les if b != float("inf")], [per_le[b] for b in les]
