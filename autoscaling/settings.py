"""Autoscaling settings: SLOs, bounds and the rules that keep scaling calm.

They live in ``AppConfig.autoscaling`` (one source of truth); the builder hands them to the
Ray policies as ``policy_kwargs`` and the simulator reads the same model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseBounds(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=0)
    replica_cost: float = Field(
        1.0, gt=0, description="What one replica of this phase takes from the budget (GPUs, "
        "or cores on CPU); lets prefill and decode run on different GPU types.")
    profile: str | None = Field(
        None, description="This phase's capacity profile when it runs on other hardware "
        "than the app's `profile` (prefill on H100, decode on L40S); None = that one.")

    @model_validator(mode="after")
    def _ordered(self) -> PhaseBounds:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas "
                             f"({self.min_replicas})")
        return self


class AutoscalingSettings(_Strict):
    enabled: bool = Field(False, description="Off: fixed num_replicas per phase.")
    profile: str = Field("cpu-tiny-llama", description="Capacity profile: a committed name "
                         "(autoscaling/profiles/<name>.json) or a path.")
    ttft_slo_ms: float = Field(2000.0, gt=0, description="Time-to-first-token objective.")
    itl_slo_ms: float = Field(100.0, gt=0, description="Inter-token-latency objective.")
    prefill: PhaseBounds = Field(default_factory=lambda: PhaseBounds(max_replicas=2))
    decode: PhaseBounds = Field(default_factory=lambda: PhaseBounds(max_replicas=2))
    aggregated: PhaseBounds = Field(default_factory=lambda: PhaseBounds(max_replicas=2),
                                    description="mode: aggregated (sized on both demands).")
    target_utilization: float = Field(
        0.8, gt=0, le=1, description="Prefill throughput the policy plans to use: headroom "
        "for Poisson bursts.")
    kv_target_usage: float = Field(0.8, gt=0, le=1, description="Decode KV-cache fill the "
                                   "policy plans for.")
    pd_ratio_min: float | None = Field(None, gt=0, description="Lowest prefill:decode "
                                       "replica ratio; None = unbounded.")
    pd_ratio_max: float | None = Field(None, gt=0, description="Highest prefill:decode ratio.")
    budget: float | None = Field(None, gt=0, description="Total replica_cost both phases may "
                                 "use (GPUs or cores); None = only max_replicas.")
    upscale_cooldown_s: float = Field(5.0, ge=0, description="Between two scale-ups of a phase.")
    downscale_cooldown_s: float = Field(60.0, ge=0, description="After any scale event of a "
                                        "phase before it may shrink.")
    downscale_stable_s: float = Field(30.0, ge=0, description="Demand must stay below the "
                                      "smaller size this long before shrinking.")
    downscale_headroom: float = Field(0.25, ge=0, lt=1, description="Hysteresis: shrink only "
                                      "when demand × (1 + headroom) fits the smaller size.")
    max_step_up: int = Field(2, ge=1, description="Replicas a phase may add per decision.")
    max_step_down: int = Field(1, ge=1, description="Replicas a phase may remove per decision.")
    allow_scale_to_zero: bool = Field(False, description="Let a phase go to 0 replicas.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window of the signals.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas push them.")

    def profile_for(self, phase: str) -> str:
        """The capacity profile sizing ``phase``: its own, else the app's."""
        return getattr(self, phase).profile or self.profile

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSettings:
        for name, b in (("prefill", self.prefill), ("decode", self.decode),
                        ("aggregated", self.aggregated)):
            if b.min_replicas == 0 and not self.allow_scale_to_zero:
                raise ValueError(f"autoscaling.{name}.min_replicas is 0: set "
                                 "allow_scale_to_zero: true to allow it")
        lo, hi = self.pd_ratio_min, self.pd_ratio_max
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(f"pd_ratio_max ({hi}) < pd_ratio_min ({lo})")
        floor = (self.prefill.min_replicas * self.prefill.replica_cost
                 + self.decode.min_replicas * self.decode.replica_cost)
        if self.budget is not None and self.budget < floor:
            raise ValueError(f"budget {self.budget} is below what the minimum replicas "
                             f"already cost ({floor})")
        return self
