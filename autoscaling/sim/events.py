"""The event loop: a heap of (time, sequence, callback).

Events at the same time run in the order they were scheduled (the sequence number breaks
ties), so a replay is deterministic and a test can reason about ordering.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self, start: float = 0.0):
        self.now = start
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at simulated time ``when`` (never in the past)."""
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + max(delay, 0.0), fn, *args)

    def __len__(self) -> int:
        return len(self._queue)

    def run(self, until: float | None = None) -> None:
        """Process events in time order until none is left or the next one is later than
        ``until`` (periodic events end the replay by not rescheduling themselves)."""
        q = self._queue
        pop = heapq.heappop
        while q:
            if until is not None and q[0][0] > until:
                self.now = until
                return
            when, _, fn, args = pop(q)
            self.now = when
            fn(*args)
