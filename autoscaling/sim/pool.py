"""A deployment's replicas: least-loaded routing, resizing with start-up and draining, and
the replica-seconds it costs.

Resizing follows Ray Serve: the target counts replicas starting or running; growing starts
new replicas that serve after ``profile.startup_s``; shrinking cancels starting replicas
first, then drains the newest running ones (Ray's ``_get_replicas_to_stop`` order: not
running first, then newer first); a draining replica finishes what it holds and takes
nothing new. A replica costs from the moment it is requested until it stops, start-up included, as
a GPU does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from autoscaling.sim.engines import DRAINING, RUNNING, STARTING, Replica
from autoscaling.sim.events import EventLoop


@dataclass(frozen=True)
class PoolSample:
    t: float
    running: int
    starting: int
    draining: int


class Pool:
    def __init__(self, phase: str, factory: Callable[[str], Replica], loop: EventLoop,
                 startup_s: float, replica_cost: float = 1.0):
        self.phase, self.loop = phase, loop
        self._factory = factory
        self.startup_s, self.replica_cost = startup_s, replica_cost
        self.replicas: list[Replica] = []  # every replica ever, in creation order
        self.live: list[Replica] = []  # starting, running or draining
        self.timeline: list[PoolSample] = []
        self.on_ready: Callable[[Replica], None] | None = None
        self.pending: deque = deque()  # requests waiting for a replica to run (Ray's handle
        # queue); only with no replica running, i.e. scale-to-zero or a cold start
        self._n = 0

    # --- views -------------------------------------------------------------------------

    def by_state(self, state: str) -> list[Replica]:
        return [r for r in self.live if r.state == state]

    @property
    def running(self) -> list[Replica]:
        return self.by_state(RUNNING)

    @property
    def num_running(self) -> int:
        return sum(1 for r in self.live if r.state == RUNNING)

    @property
    def target(self) -> int:
        """Replicas starting or running (what Ray calls the target)."""
        return sum(1 for r in self.live if r.state in (STARTING, RUNNING))

    def lifetimes(self, until: float) -> list[tuple[float, float]]:
        """(requested, stopped) of every replica, cut at ``until``."""
        return [(r.requested_t, min(r.stopped_t if r.stopped_t is not None else until, until))
                for r in self.replicas]

    def replica_seconds(self, until: float, since: float = 0.0) -> float:
        return sum(max(min(end, until) - max(start, since), 0.0)
                   for start, end in self.lifetimes(until))

    # --- routing -------------------------------------------------------------------------

    def route(self) -> Replica | None:
        """The least-loaded running replica (ties: the oldest); None while none runs (the
        caller parks the request in :attr:`pending` until :attr:`on_ready` fires)."""
        running = self.running
        return min(running, key=Replica.routing_load) if running else None

    # --- resizing ------------------------------------------------------------------------

    def _new(self, warm: bool) -> Replica:
        self._n += 1
        rep = self._factory(f"{self.phase}-{self._n}")
        rep.on_stopped = self._stopped
        self.replicas.append(rep)
        self.live.append(rep)
        if warm:
            rep.become_ready()
        else:
            self.loop.after(self.startup_s, self._ready, rep)
        return rep

    def start(self, n: int) -> None:
        """``n`` replicas already serving at the start of the replay (no start-up)."""
        for _ in range(n):
            self._new(warm=True)
        self._sample()

    def set_target(self, n: int) -> None:
        n = max(n, 0)
        cur = self.target
        if n > cur:
            for _ in range(n - cur):
                self._new(warm=False)
        elif n < cur:
            excess = cur - n
            newest_first = list(reversed(self.live))  # creation order, newest first
            for rep in [r for r in newest_first if r.state == STARTING][:excess]:
                rep.drain()
                excess -= 1
            for rep in [r for r in newest_first if r.state == RUNNING][:excess]:
                rep.drain()
        self._sample()

    def _ready(self, rep: Replica) -> None:
        if rep.state == STARTING:
            rep.become_ready()
            self._sample()
            if self.on_ready is not None:
                self.on_ready(rep)

    def _stopped(self, rep: Replica) -> None:
        self.live.remove(rep)
        self._sample()

    def _sample(self) -> None:
        s = PoolSample(self.loop.now, self.num_running, len(self.by_state(STARTING)),
                       len(self.by_state(DRAINING)))
        if self.timeline and self.timeline[-1].t == s.t:
            self.timeline[-1] = s
        else:
            self.timeline.append(s)
