"""app/diagnostics.py: heap reports see objects that stay alive and growth() names them."""

from __future__ import annotations

import tracemalloc

from app.diagnostics import growth, heap_report


class Kept:
    pass


def test_growth_names_the_type_and_line_that_kept_objects():
    tracemalloc.start(1)
    try:
        before = heap_report(top_types=10_000, top_sites=10_000)
        kept = [Kept() for _ in range(5000)]  # the leak
        after = heap_report(top_types=10_000, top_sites=10_000)
    finally:
        tracemalloc.stop()
    grown = growth(before, after, top=50)
    types = dict(grown["types"])
    assert types[f"{__name__}.Kept"] >= 5000, grown["types"][:5]
    assert any(__file__ in site for site, _ in grown["sites"]), grown["sites"][:5]
    assert len(kept) == 5000


def test_without_tracemalloc_only_types_are_counted():
    assert not tracemalloc.is_tracing()
    report = heap_report()
    assert report["sites"] is None and report["objects"] > 0
    assert growth(report, report) == {"types": [], "sites": []}
