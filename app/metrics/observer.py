"""The hooks the Ray-free request flow (orchestrator, migrator) calls to report what happened.

The default :data:`NULL_OBSERVER` does nothing, so unit tests and plain scripts need no Ray;
the engine replicas pass :class:`app.metrics.ray_metrics.FrontMetrics`, which records them.
"""

from __future__ import annotations

from typing import Protocol


class FlowObserver(Protocol):
    def prefill_leg(self, outcome: str, seconds: float) -> None:
        """A remote prefill leg ended (``app.metrics.math.prefill_outcome``)."""

    def fallback(self, reason: str) -> None:
        """A request meant to disaggregate falls back to local prefill."""

    def migration(self, outcome: str) -> None:
        """A migration: ``rerun``, ``continued`` or ``failed``."""

    def token_one(self, source: str) -> None:
        """A disaggregated stream's token 1 came from ``prefill`` or ``decode``."""


class NullObserver:
    def prefill_leg(self, outcome: str, seconds: float) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def migration(self, outcome: str) -> None:
        pass

    def token_one(self, source: str) -> None:
        pass


NULL_OBSERVER = NullObserver()
