"""Where a replica process's memory goes: for finding a slow leak in a soak.

:func:`heap_report` counts live Python objects by type and, when ``tracemalloc`` traces
(start the replica with ``PYTHONTRACEMALLOC=<frames>`` in its ``runtime_env``), sums the
allocations still alive by the line that made them. Two reports taken minutes apart under a
steady load show what grows (``bench/replica_heap.py``). No Ray, no vLLM.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter
from typing import Any


def heap_report(top_types: int = 60, top_sites: int = 60) -> dict[str, Any]:
    """Live object counts by type (the ``top_types`` most common) and, when tracing, the
    ``top_sites`` allocation sites by live bytes (``[site, bytes, blocks]``)."""
    gc.collect()
    counts = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    report: dict[str, Any] = {"objects": sum(counts.values()),
                              "types": counts.most_common(top_types), "sites": None}
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")
        report["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        report["sites"] = [[str(s.traceback[0]), s.size, s.count] for s in stats[:top_sites]]
    return report


def growth(before: dict[str, Any], after: dict[str, Any], top: int = 15
           ) -> dict[str, list[tuple[str, int]]]:
    """What grew between two reports: types by count, sites by bytes, largest first."""
    def diff(a: list, b: list, col: int) -> list[tuple[str, int]]:
        old = {row[0]: row[col] for row in a or []}
        grown = [(row[0], row[col] - old.get(row[0], 0)) for row in b or []]
        return sorted((g for g in grown if g[1] > 0), key=lambda g: -g[1])[:top]

    return {"types": diff(before["types"], after["types"], 1),
            "sites": diff(before.get("sites"), after.get("sites"), 1)}
