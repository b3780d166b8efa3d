"""The policies in the loop: each turns a view of the pools into per-phase replica targets.

- :class:`PDDriver` runs the production ``autoscaling.policies.PDAppPolicy`` on fake Ray
  ``AutoscalingContext`` objects (the attributes the policy reads: ``current_num_replicas``,
  ``aggregated_metrics``, ``current_time``, ``config.policy.policy_kwargs``), then Ray's
  app-level wrapper, which is neutral for it (the builder sets Ray's delays to 0 and factors
  to 1), then the bounds: so the simulator exercises the code Ray runs.
- :class:`RayDefaultDriver`: Ray's default policy per phase (:mod:`autoscaling.baselines`).
- :class:`DynamoDriver`: the Dynamo-style SLA planner (:mod:`autoscaling.baselines`).
- :class:`FixedDriver`: fixed counts (peak provisioning).

A driver returns ``{phase: target}`` for the phases it wants to change (Ray's target counts
starting and running replicas), or nothing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Protocol

from autoscaling.baselines import (
    DynamoConfig,
    DynamoPlanner,
    IntervalObservation,
    RayDefaultConfig,
    RayDefaultPolicy,
)
from autoscaling.policies import PDAppPolicy
from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings


class View(Protocol):
    """What a driver may look at (implemented by :class:`autoscaling.sim.cluster.Cluster`)."""

    now: float

    def running(self, phase: str) -> int: ...
    def target(self, phase: str) -> int: ...
    def metrics(self, phase: str) -> dict[str, dict[str, float]]: ...
    def ongoing(self, phase: str) -> float: ...
    def window_requests(self, t0: float, t1: float) -> dict[str, Any]: ...


class Driver(Protocol):
    name: str
    look_back_s: float  # the window the replicas' metrics are averaged over

    def decide(self, view: View) -> dict[str, int]: ...


def _bounded(settings: AutoscalingSettings, phase: str, n: int) -> int:
    b = getattr(settings, phase)
    return min(max(n, b.min_replicas), b.max_replicas)


class PDDriver:
    """Ours, through ``PDAppPolicy`` (``current_num_replicas`` = running replicas and
    ``target_num_replicas`` = starting + running, as Ray's context has them)."""

    name = "pd"

    def __init__(self, settings: AutoscalingSettings, phases: tuple[str, ...]):
        self.settings, self.phases = settings, phases
        self.look_back_s = settings.look_back_period_s
        self.policy = PDAppPolicy()
        dumped = settings.model_dump()
        self._config = {p: SimpleNamespace(policy=SimpleNamespace(
            policy_kwargs={"phase": p, "settings": dumped})) for p in phases}
        self.last_states: dict[str, Any] = {}

    def decide(self, view: View) -> dict[str, int]:
        ctxs = {}
        for p in self.phases:
            ctxs[p] = SimpleNamespace(
                current_num_replicas=view.running(p), target_num_replicas=view.target(p),
                aggregated_metrics=view.metrics(p), current_time=view.now,
                config=self._config[p])
        targets, states = self.policy(ctxs)
        self.last_states = states
        return {p: _bounded(self.settings, p, t) for p, t in targets.items()}


class RayDefaultDriver:
    """Ray's default policy on every phase, with its 30 s look-back."""

    name = "ray-default"

    def __init__(self, settings: AutoscalingSettings, phases: tuple[str, ...],
                 target_ongoing: dict[str, float], base: RayDefaultConfig | None = None):
        base = base or RayDefaultConfig()
        self.look_back_s = base.look_back_period_s
        self.target_ongoing = dict(target_ongoing)
        self.policies = {}
        for p in phases:
            b = getattr(settings, p)
            cfg = RayDefaultConfig(**{**base.__dict__, "target_ongoing_requests":
                                      target_ongoing[p], "min_replicas": b.min_replicas,
                                      "max_replicas": b.max_replicas})
            self.policies[p] = RayDefaultPolicy(cfg)

    def decide(self, view: View) -> dict[str, int]:
        return {p: pol(view.now, view.running(p), view.target(p), view.ongoing(p))
                for p, pol in self.policies.items()}


class DynamoDriver:
    """The Dynamo-style planner every ``adjustment_interval_s`` (disaggregated only, as
    Dynamo's SLA planner of that design)."""

    name = "dynamo-planner"

    def __init__(self, profile: Profile, cfg: DynamoConfig, look_back_s: float = 10.0):
        self.planner = DynamoPlanner(profile, cfg)
        self.interval = cfg.adjustment_interval_s
        self.look_back_s = look_back_s
        self._last = 0.0

    def decide(self, view: View) -> dict[str, int]:
        if view.now - self._last < self.interval - 1e-9:
            return {}
        t0, self._last = self._last, view.now
        w = view.window_requests(t0, view.now)
        obs = IntervalObservation(num_req=w["num_req"], isl=w["isl"], osl=w["osl"],
                                  ttft_ms=w["ttft_ms"], itl_ms=w["itl_ms"],
                                  request_duration_s=w["duration_s"])
        p, d = self.planner.plan(obs, view.running("prefill"), view.running("decode"))
        return {"prefill": p, "decode": d}


class FixedDriver:
    name = "fixed"
    look_back_s = 10.0

    def __init__(self, counts: dict[str, int]):
        self.counts = dict(counts)

    def decide(self, view: View) -> dict[str, int]:
        return {p: n for p, n in self.counts.items() if view.target(p) != n}
