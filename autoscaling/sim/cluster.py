"""One replay: requests arrive, are routed through the pools, and a driver resizes the pools.

Disaggregated (this app's flow): on arrival the request is routed to the least-loaded decode
replica (the ingress), which sends it to the least-loaded prefill replica; when the prompt is
computed its KV moves for ``profile.transfer_ms(prompt)``, then the decode replica admits it.
Aggregated: one pool, each replica prefills and decodes its own requests.

Two periodic events drive the control plane: every ``settings.metrics_interval_s`` each
running replica records its signals (what ``record_autoscaling_stats()`` returns), and every
``tick_s`` the driver decides. Both stop once every request is done, which ends the replay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.sim.drivers import Driver
from autoscaling.sim.engines import (
    RUNNING,
    AggregatedReplica,
    DecodeReplica,
    PrefillReplica,
    Replica,
)
from autoscaling.sim.events import EventLoop
from autoscaling.sim.pool import Pool, PoolSample
from autoscaling.sim.telemetry import ONGOING
from autoscaling.sim.workload import SimRequest

LAYOUTS = {"disaggregated": ("prefill", "decode"), "aggregated": ("aggregated",)}


@dataclass
class SimConfig:
    profile: Profile
    settings: AutoscalingSettings
    layout: str = "disaggregated"
    initial: dict[str, int] | None = None  # replicas serving at t=0; default min_replicas
    tick_s: float = 1.0  # how often the driver decides
    max_time_s: float | None = None  # hard stop (unfinished requests count as misses)

    @property
    def phases(self) -> tuple[str, ...]:
        return LAYOUTS[self.layout]


@dataclass
class SimResult:
    requests: list[SimRequest]
    timelines: dict[str, list[PoolSample]]
    replica_seconds: dict[str, float]
    horizon_s: float
    lifetimes: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    decisions: list[tuple[float, str, int]] = field(default_factory=list)
    driver: str = ""
    layout: str = "disaggregated"
    wall_s: float = 0.0


class Cluster:
    """The pools plus the :class:`~autoscaling.sim.drivers.View` a driver reads."""

    def __init__(self, requests: list[SimRequest], cfg: SimConfig, driver: Driver):
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}")
        self.requests, self.cfg, self.driver = requests, cfg, driver
        self.loop = EventLoop()
        self.profile, self.settings = cfg.profile, cfg.settings
        self.pools: dict[str, Pool] = {}
        self._decode_of: dict[int, DecodeReplica] = {}
        self.finished: list[SimRequest] = []
        self.decisions: list[tuple[float, str, int]] = []
        self._next = 0
        look_back = driver.look_back_s
        prof = cfg.profile
        makers = {
            "prefill": lambda rid: PrefillReplica(rid, prof, self.loop, look_back,
                                                  self._prefilled, self._decode_busy),
            "decode": lambda rid: DecodeReplica(rid, prof, self.loop, look_back,
                                                self._finished, self._prefill_busy),
            "aggregated": lambda rid: AggregatedReplica(rid, prof, self.loop, look_back,
                                                        self._finished),
        }
        for phase in cfg.phases:
            bounds = getattr(cfg.settings, phase)
            pool = Pool(phase, makers[phase], self.loop, prof.startup_s, bounds.replica_cost)
            pool.on_ready = self._flusher(phase)
            self.pools[phase] = pool
            n = (cfg.initial or {}).get(phase, max(bounds.min_replicas, 1))
            pool.start(n)

    def _busy_share(self, phase: str, busy: Callable[[Replica], bool]) -> float:
        """Share of the phase's running replicas for which ``busy`` holds (host sharing)."""
        pool = self.pools.get(phase)
        running = [r for r in pool.live if r.state == RUNNING] if pool else []
        return sum(1 for r in running if busy(r)) / len(running) if running else 0.0

    def _prefill_busy(self) -> float:
        return self._busy_share("prefill", lambda r: bool(r.in_step))  # mid-step

    def _decode_busy(self) -> float:
        return self._busy_share("decode", lambda r: bool(r.running))  # sequences to decode

    # --- View ----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.now

    def running(self, phase: str) -> int:
        return self.pools[phase].num_running

    def target(self, phase: str) -> int:
        return self.pools[phase].target

    def metrics(self, phase: str) -> dict[str, dict[str, float]]:
        """``aggregated_metrics``: key -> running replica -> look-back mean."""
        out: dict[str, dict[str, float]] = {}
        for rep in self.pools[phase].live:
            if rep.state != RUNNING:
                continue
            for k, v in rep.telemetry.means().items():
                if k != ONGOING:
                    out.setdefault(k, {})[rep.id] = v
        return out

    def ongoing(self, phase: str) -> float:
        """Ray's ``total_num_requests``: running replicas' look-back means plus requests
        queued for lack of a replica."""
        pool = self.pools[phase]
        total = float(len(pool.pending))
        for rep in pool.live:
            if rep.state == RUNNING:
                total += rep.telemetry.means().get(ONGOING, 0.0)
        return total

    def window_requests(self, t0: float, t1: float) -> dict[str, Any]:
        """What a Prometheus query over ``[t0, t1)`` would return: requests that arrived in
        it, and means over the requests that finished in it."""
        arrived = [r for r in self.requests if t0 <= r.arrival < t1]
        done = [r for r in self.finished if t0 <= r.finished_t < t1]
        base = done or arrived

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        multi = [r for r in done if r.output > 1]
        itl_tokens = sum(r.output - 1 for r in multi)
        return {
            "num_req": float(len(arrived)),
            "isl": mean([r.prompt for r in base]) or 0.0,
            "osl": mean([r.output for r in base]) or 0.0,
            "ttft_ms": mean([r.ttft_ms for r in done]),
            "itl_ms": (sum(r.tpot_ms * (r.output - 1) for r in multi) / itl_tokens
                       if itl_tokens else None),
            "duration_s": mean([r.e2e_ms / 1e3 for r in done]),
        }

    # --- request flow --------------------------------------------------------------------

    def _arrive(self) -> None:
        req = self.requests[self._next]
        self._next += 1
        if self._next < len(self.requests):
            self.loop.at(self.requests[self._next].arrival, self._arrive)
        self._dispatch(self.cfg.phases[-1], req)

    def _dispatch(self, phase: str, req: SimRequest) -> None:
        pool = self.pools[phase]
        rep = pool.route()
        if rep is None:
            pool.pending.append(req)
            return
        if phase == "decode":
            assert isinstance(rep, DecodeReplica)
            rep.assign(req)
            self._decode_of[req.id] = rep
            self._dispatch("prefill", req)
        else:
            assert isinstance(rep, PrefillReplica | AggregatedReplica)
            rep.enqueue(req)

    def _flusher(self, phase: str):
        def flush(_: Replica) -> None:
            pool = self.pools[phase]
            while pool.pending and pool.num_running:
                self._dispatch(phase, pool.pending.popleft())
        return flush

    def _prefilled(self, req: SimRequest) -> None:
        dec = self._decode_of.pop(req.id)
        dec.kv_incoming(req)
        self.loop.after(self.profile.transfer_ms(req.prompt) / 1e3, dec.kv_arrived, req)

    def _finished(self, req: SimRequest) -> None:
        self.finished.append(req)

    # --- control plane -------------------------------------------------------------------

    def _all_done(self) -> bool:
        return len(self.finished) >= len(self.requests)

    def _record(self) -> None:
        if self._all_done():
            return
        for pool in self.pools.values():
            for rep in pool.live:
                if rep.state == RUNNING:
                    rep.record_signals()
        self.loop.after(self.settings.metrics_interval_s, self._record)

    def _tick(self) -> None:
        if self._all_done():
            return
        for phase, n in self.driver.decide(self).items():
            pool = self.pools[phase]
            if n != pool.target:
                self.decisions.append((self.now, phase, n))
                pool.set_target(n)
        self.loop.after(self.cfg.tick_s, self._tick)

    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        if self.requests:
            self.loop.at(self.requests[0].arrival, self._arrive)
        self.loop.at(0.0, self._record)
        self.loop.at(self.cfg.tick_s, self._tick)
        self.loop.run(until=self.cfg.max_time_s)
        ends = [r.finished_t for r in self.requests if not math.isnan(r.finished_t)]
        horizon = max(ends) if ends else self.now
        if self.cfg.max_time_s is not None and not self._all_done():
            horizon = self.cfg.max_time_s
        for pool in self.pools.values():
            pool.timeline.append(PoolSample(horizon, pool.num_running,
                                            pool.target - pool.num_running, 0))
        return SimResult(
            requests=self.requests,
            timelines={p: pool.timeline for p, pool in self.pools.items()},
            replica_seconds={p: pool.replica_seconds(horizon)
                             for p, pool in self.pools.items()},
            horizon_s=horizon,
            lifetimes={p: pool.lifetimes(horizon) for p, pool in self.pools.items()},
            decisions=self.decisions, driver=self.driver.name, layout=self.cfg.layout,
            wall_s=time.perf_counter() - t_wall)


def simulate(requests: list[SimRequest], cfg: SimConfig, driver: Driver) -> SimResult:
    """Replay ``requests`` (reset first, so a list can be replayed under several drivers)."""
    for r in requests:
        r.prefill_done_t = r.first_token_t = r.finished_t = math.nan
    return Cluster(requests, cfg, driver).run()
