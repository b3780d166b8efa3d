"""Turns both phases' demands into replica targets: bounds, hysteresis, cooldowns, step limits,
the P:D ratio and a shared budget, with prefill served first on bursts.

Pure and clock-injected, so Ray's controller, the unit tests and the simulator run the very
same decisions. One instance per application keeps the small state the rules need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoscaling.settings import AutoscalingSettings, PhaseBounds

PHASES = ("prefill", "decode", "aggregated")


@dataclass
class _PhaseMemory:
    last_up: float = -math.inf
    last_down: float = -math.inf
    below_since: float | None = None  # since when demand fits a smaller size


@dataclass(frozen=True)
class Decision:
    targets: dict[str, int]
    reasons: dict[str, str]


@dataclass
class Coordinator:
    settings: AutoscalingSettings
    memory: dict[str, _PhaseMemory] = field(default_factory=lambda: {p: _PhaseMemory()
                                                                   for p in PHASES})

    def bounds(self, phase: str) -> PhaseBounds:
        return getattr(self.settings, phase)

    def decide(self, now: float, current: dict[str, int], demand: dict[str, float],
               reasons: dict[str, str] | None = None) -> Decision:
        """``current``/``demand``: per phase present (one phase alone works too)."""
        why = dict(reasons or {})
        targets = {p: self._phase_target(p, now, current[p], demand[p], why) for p in current}
        if "prefill" in targets and "decode" in targets:
            targets = self._couple(current, targets, why)
        for p, t in targets.items():
            mem = self.memory[p]
            if t > current[p]:
                mem.last_up = now
                mem.below_since = None
            elif t < current[p]:
                mem.last_down = now
                mem.below_since = None
        return Decision(targets, why)

    # --- one phase ----------------------------------------------------------------------------

    def _phase_target(self, phase: str, now: float, cur: int, demand: float,
                      why: dict[str, str]) -> int:
        s, b, mem = self.settings, self.bounds(phase), self.memory[phase]
        lo = b.min_replicas if (s.allow_scale_to_zero or b.min_replicas > 0) else 1
        want = min(max(math.ceil(demand - 1e-9), lo), b.max_replicas)
        if cur < lo or cur > b.max_replicas:  # outside bounds (config changed): fix at once
            return min(max(cur, lo), b.max_replicas)
        if want > cur:
            mem.below_since = None
            if now - mem.last_up < s.upscale_cooldown_s:
                why[phase] = f"up to {want} waits for the upscale cooldown"
                return cur
            return min(want, cur + s.max_step_up)
        # Hysteresis: a smaller size must fit demand with headroom, for a while.
        fits = min(max(math.ceil(demand * (1 + s.downscale_headroom) - 1e-9), lo), cur)
        if fits >= cur:
            mem.below_since = None
            return cur
        if mem.below_since is None:
            mem.below_since = now
        if now - mem.below_since < s.downscale_stable_s:
            why[phase] = f"demand fits {fits}, waiting {s.downscale_stable_s:.0f}s of it"
            return cur
        if now - max(mem.last_up, mem.last_down) < s.downscale_cooldown_s:
            why[phase] = f"down to {fits} waits for the cooldown"
            return cur
        return max(fits, cur - s.max_step_down)

    # --- both phases --------------------------------------------------------------------------

    def _couple(self, cur: dict[str, int], t: dict[str, int], why: dict[str, str]
                ) -> dict[str, int]:
        s = self.settings
        p, d = t["prefill"], t["decode"]
        pb, db = self.bounds("prefill"), self.bounds("decode")
        # P:D ratio: raise the lagging side when it may grow, else trim the leading one.
        if s.pd_ratio_max is not None and p > s.pd_ratio_max * d:
            need_d = math.ceil(p / s.pd_ratio_max - 1e-9)
            if need_d <= db.max_replicas and need_d > d:
                d = need_d
            else:
                p = max(math.floor(s.pd_ratio_max * d + 1e-9), 1)
            why.setdefault("ratio", f"P:D <= {s.pd_ratio_max}")
        if s.pd_ratio_min is not None and p < s.pd_ratio_min * d:
            need_p = math.ceil(s.pd_ratio_min * d - 1e-9)
            if need_p <= pb.max_replicas:
                p = need_p
            else:
                d = max(math.floor(p / s.pd_ratio_min + 1e-9), 1)
            why.setdefault("ratio", f"P:D >= {s.pd_ratio_min}")
        # Budget: growth is granted prefill first (a burst hits TTFT before decode load
        # arrives); shrinking is never blocked by the budget.
        if s.budget is not None:
            def cost(pp: int, dd: int) -> float:
                return pp * pb.replica_cost + dd * db.replica_cost

            base_p, base_d = min(p, cur["prefill"]), min(d, cur["decode"])
            if cost(base_p, base_d) > s.budget:  # already over (budget lowered): shrink decode
                while cost(base_p, base_d) > s.budget and base_d > db.min_replicas:
                    base_d -= 1
                while cost(base_p, base_d) > s.budget and base_p > pb.min_replicas:
                    base_p -= 1
            gp, gd = base_p, base_d
            while gp < p and cost(gp + 1, gd) <= s.budget:
                gp += 1
            while gd < d and cost(gp, gd + 1) <= s.budget:
                gd += 1
            if (gp, gd) != (p, d):
                why.setdefault("budget", f"budget {s.budget:g} caps P={gp} D={gd} "
                               f"(wanted {p}/{d})")
            p, d = gp, gd
        return {"prefill": min(max(p, 0), pb.max_replicas),
                "decode": min(max(d, 0), db.max_replicas)}
