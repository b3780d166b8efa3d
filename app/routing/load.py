"""Per-replica load as the router sees it: the replica's last report plus what was booked since.

Replicas publish a report whenever their load changes (see :mod:`app.routing.publisher`), so
the router's view is a few milliseconds old. A burst of requests arrives faster than that: each
routed request is booked on its replica at once and counted until a report taken after the
request reached the replica replaces it. A replica silent for ``stale_after_s`` is taken for
dead (its heartbeat stopped) and left out of routing until it reports again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.routing.policy import ReplicaLoad


@dataclass
class _Booking:
    at: float
    prefill_tokens: int
    kv_blocks: int


@dataclass
class _ReplicaState:
    registered_at: float
    report: dict[str, Any] = field(default_factory=dict)
    reported_at: float | None = None
    bookings: list[_Booking] = field(default_factory=list)


class LoadBook:
    def __init__(self, stale_after_s: float = 3.0, report_lag_s: float = 0.05,
                 booking_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.stale_after_s = stale_after_s
        self.report_lag_s = report_lag_s  # time for a routed request to reach its replica
        self.booking_ttl_s = booking_ttl_s
        self._clock = clock
        self._replicas: dict[str, _ReplicaState] = {}

    def add(self, replica: str) -> None:
        self._replicas.setdefault(replica, _ReplicaState(self._clock()))

    def remove(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def report(self, replica: str, report: dict[str, Any]) -> None:
        state = self._replicas.get(replica)
        if state is None:
            return
        now = self._clock()
        state.report, state.reported_at = report, now
        covered = now - self.report_lag_s
        state.bookings = [b for b in state.bookings if b.at > covered]

    def mark_down(self, replica: str) -> None:
        """Its connection dropped (the process died or restarted): out of routing until it
        reports again."""
        state = self._replicas.get(replica)
        if state is not None:
            state.reported_at = float("-inf")

    def book(self, replica: str, prefill_tokens: int, kv_blocks: int) -> None:
        state = self._replicas.get(replica)
        if state is not None:
            state.bookings.append(_Booking(self._clock(), prefill_tokens, kv_blocks))

    def alive(self, replica: str) -> bool:
        """Reported recently; a replica that never reported gets ``stale_after_s`` of grace."""
        state = self._replicas.get(replica)
        if state is None:
            return False
        last = state.reported_at if state.reported_at is not None else state.registered_at
        return self._clock() - last <= self.stale_after_s

    def last_report(self, replica: str) -> dict[str, Any]:
        state = self._replicas.get(replica)
        return dict(state.report) if state else {}

    def load(self, replica: str) -> ReplicaLoad:
        state = self._replicas.get(replica)
        if state is None:
            return ReplicaLoad()
        now = self._clock()
        state.bookings = [b for b in state.bookings if now - b.at <= self.booking_ttl_s]
        r = state.report
        return ReplicaLoad(
            queued_prefill_tokens=int(r.get("queued_prefill_tokens", 0))
            + sum(b.prefill_tokens for b in state.bookings),
            active_kv_blocks=int(r.get("active_kv_blocks", 0))
            + sum(b.kv_blocks for b in state.bookings),
            kv_usage=float(r.get("kv_usage", 0.0)),
            running=int(r.get("running", 0)) + len(state.bookings),
        )
