"""Ray Serve autoscaling policies, by import path: thin shells over signals, sizing and the
coordinator (no Ray import: Ray hands them an ``AutoscalingContext``, read by attribute).

- ``autoscaling.policies:PhasePolicy``: a deployment-level policy, one phase on its own.
  The builder sets it on every engine deployment with ``policy_kwargs`` = the phase and the
  app's ``AutoscalingSettings``.
- ``autoscaling.policies:PDAppPolicy``: the application-level policy that sizes both phases
  together (P:D ratio, budget, prefill first). Set it in the serve YAML::

      applications:
        - name: pd
          autoscaling_policy: {policy_function: autoscaling.policies:PDAppPolicy}

  It reads the settings from the deployments' own policy kwargs, so they stay in one place.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autoscaling.coordinator import Coordinator
from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.signals import decode_signals, prefill_signals
from autoscaling.sizing import Demand, decode_demand, prefill_demand

log = logging.getLogger("ray.serve")


class PhaseSizer:
    """Demand of one phase from its pool's metrics (``aggregated``: the larger of both)."""

    def __init__(self, phase: str, settings: AutoscalingSettings, profile: Profile):
        self.phase, self.settings, self.profile = phase, settings, profile

    def demand(self, metrics: Any, current: int) -> Demand:
        s = self.settings
        demands = []
        if self.phase in ("prefill", "aggregated"):
            demands.append(prefill_demand(prefill_signals(metrics), self.profile,
                                          s.ttft_slo_ms, s.target_utilization, current))
        if self.phase in ("decode", "aggregated"):
            demands.append(decode_demand(decode_signals(metrics), self.profile, s.itl_slo_ms,
                                         s.kv_target_usage, current))
        return max(demands, key=lambda d: d.replicas)


def _now(ctx: Any) -> float:
    now = getattr(ctx, "current_time", None)
    return time.time() if now is None else now


def _sizes(ctx: Any) -> tuple[int, int]:
    """(running, target). Demand is measured on the running replicas; decisions move the
    target, so replicas still starting are not asked for again."""
    running = ctx.current_num_replicas
    return running, max(getattr(ctx, "target_num_replicas", running) or 0, 0)


def _kwargs(ctx: Any) -> dict[str, Any]:
    policy = getattr(ctx.config, "policy", None)
    return dict(getattr(policy, "policy_kwargs", None) or {})


class PhasePolicy:
    """Deployment-level: ``PhasePolicy(phase=..., settings={...})``, called every tick."""

    def __init__(self, phase: str, settings: dict[str, Any]):
        self.settings = AutoscalingSettings.model_validate(settings)
        self.sizer = PhaseSizer(phase, self.settings,
                                Profile.load(self.settings.profile_for(phase)))
        self.coordinator = Coordinator(self.settings)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        phase = self.sizer.phase
        running, cur = _sizes(ctx)
        demand = self.sizer.demand(ctx.aggregated_metrics or {}, running)
        decision = self.coordinator.decide(_now(ctx), {phase: cur}, {phase: demand.replicas},
                                           {phase: demand.reason})
        target = decision.targets[phase]
        if target != cur:
            log.info("autoscaling %s: %d -> %d (%s)", phase, cur, target,
                     decision.reasons.get(phase, ""))
        return target, {"demand": round(demand.replicas, 3), "reason": demand.reason}


class PDAppPolicy:
    """Application-level: both phases in one decision. Deployments whose policy kwargs carry
    no ``phase`` (not ours) are left to Ray."""

    def __init__(self, **_: Any):
        self._sizers: dict[str, PhaseSizer] = {}
        self._coordinator: Coordinator | None = None

    def _setup(self, kwargs: dict[str, Any]) -> None:
        settings = AutoscalingSettings.model_validate(kwargs["settings"])
        self._coordinator = Coordinator(settings)
        self._sizers = {p: PhaseSizer(p, settings, Profile.load(settings.profile_for(p)))
                        for p in ("prefill", "decode", "aggregated")}

    def __call__(self, ctxs: dict[Any, Any]
                 ) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        by_phase: dict[str, tuple[Any, Any]] = {}
        for dep_id, ctx in ctxs.items():
            kwargs = _kwargs(ctx)
            if "phase" in kwargs:
                if self._coordinator is None:
                    self._setup(kwargs)
                by_phase[kwargs["phase"]] = (dep_id, ctx)
        if not by_phase:
            return {}, {}
        now = max(_now(ctx) for _, ctx in by_phase.values())
        sizes = {p: _sizes(ctx) for p, (_, ctx) in by_phase.items()}
        current = {p: target for p, (_, target) in sizes.items()}
        demands = {p: self._sizers[p].demand(ctx.aggregated_metrics or {}, sizes[p][0])
                   for p, (_, ctx) in by_phase.items()}
        decision = self._coordinator.decide(now, current, {p: d.replicas
                                                           for p, d in demands.items()},
                                            {p: d.reason for p, d in demands.items()})
        targets, states = {}, {}
        for p, (dep_id, _) in by_phase.items():
            targets[dep_id] = decision.targets[p]
            states[dep_id] = {"demand": round(demands[p].replicas, 3),
                              "reason": decision.reasons.get(p, demands[p].reason)}
            if targets[dep_id] != current[p]:
                log.info("autoscaling %s: %d -> %d (%s)", p, current[p], targets[dep_id],
                         states[dep_id]["reason"])
        return targets, states
