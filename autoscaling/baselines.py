"""The autoscalers ours is measured against, as plain arithmetic (no Ray, no Dynamo import).

**Ray Serve's default policy** (``ray/serve/autoscaling_policy.py`` and ``ray/serve/config.py``,
Ray 2.60): per deployment, every control-loop tick,

- desired = total ongoing requests (each running replica's mean over ``look_back_period_s``,
  30 s) / ``target_ongoing_requests`` (``_core_replica_queue_length_policy``);
- ``_apply_scaling_factors``: ``ceil(current + factor × (desired − current))``, factor 1.0
  by default, with one forced step down when a downscale would otherwise stall;
- ``_apply_delay_logic`` against the current *target*: a scale-up is applied once it has been
  wanted continuously for ``upscale_delay_s`` (30 s), a scale-down after ``downscale_delay_s``
  (600 s); a change of direction restarts the clock;
- then the min/max bounds. Applied to each phase on its own (Ray has no P/D coupling).

``target_ongoing_requests``: Ray's generic default is 2. Ray Serve LLM sets it (and
``max_ongoing_requests``) to 1e9 for LLM deployments (``ray/llm/_internal/serve/constants.py``,
``DEFAULT_MAX_TARGET_ONGOING_REQUESTS``), i.e. it never scales on load until the operator
picks a value. :func:`ray_tuned_targets` gives the value a careful operator would pick from a
one-replica load test at the SLOs (the profile answers that load test).

**Dynamo's SLA planner** (``components/planner/src/dynamo/planner/utils/planner_core.py`` and
``defaults.py``, ai-dynamo/dynamo): every ``adjustment_interval`` (180 s by default) it reads
the last interval's request count, mean ISL/OSL, mean TTFT/ITL and request duration, predicts
the next interval (here the ``constant`` predictor: the last value) and sets

- prefill = ceil(num_req × ISL / interval × min(1, TTFT correction) / prefill tokens/s per
  GPU at that ISL), where the correction is observed / profiled TTFT;
- decode = ceil(num_req × OSL / interval / best decode tokens/s per GPU whose ITL stays
  within SLO / ITL correction, at context ISL + OSL/2), the correction being observed /
  profiled ITL at the observed concurrency;
- at least ``min_endpoint`` each, scaled down proportionally above ``max_gpu_budget``.

Both read capacity from the same :class:`~autoscaling.profile_model.Profile` as our policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaling.profile_model import Profile

# --- Ray Serve default ----------------------------------------------------------------------


@dataclass(frozen=True)
class RayDefaultConfig:
    """``ray.serve.config.AutoscalingConfig`` defaults, except the bounds (the app's)."""

    target_ongoing_requests: float = 2.0
    min_replicas: int = 1
    max_replicas: int = 100
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    upscaling_factor: float = 1.0  # smoothing_factor's default
    downscaling_factor: float = 1.0
    look_back_period_s: float = 30.0


def ray_scaling_factors(desired: float, current: int, cfg: RayDefaultConfig) -> int:
    """``_apply_scaling_factors``."""
    if current == 0:
        return math.ceil(desired)
    delta = desired - current
    factor = cfg.upscaling_factor if delta > 0 else cfg.downscaling_factor
    scaled = math.ceil(current + factor * delta)
    if math.ceil(float(desired)) < current and scaled == current:
        scaled -= 1
    return scaled


class RayDefaultPolicy:
    """One deployment's Ray default policy with its decision state (counter, timestamp)."""

    def __init__(self, cfg: RayDefaultConfig):
        self.cfg = cfg
        self._counter = 0
        self._since: float | None = None

    def desired(self, current: int, total_ongoing: float, curr_target: int) -> float:
        """``_core_replica_queue_length_policy``: current × total / (target × current)."""
        if current == 0:
            return curr_target
        error_ratio = total_ongoing / (self.cfg.target_ongoing_requests * current)
        return current * error_ratio

    def _delay(self, desired: int, curr_target: int, now: float) -> int:
        """``_apply_delay_logic`` (timestamps, not tick counts)."""
        cfg, eps = self.cfg, 1e-6
        decision = curr_target
        if desired > curr_target:
            if self._counter < 0:
                self._counter, self._since = 0, None
            self._counter += 1
            if self._since is None:
                self._since = now
            if now - self._since + eps >= cfg.upscale_delay_s:
                self._counter, self._since = 0, None
                decision = desired
        elif desired < curr_target:
            if self._counter > 0:
                self._counter, self._since = 0, None
            self._counter -= 1
            if curr_target == 1 and cfg.downscale_to_zero_delay_s is not None:
                delay = cfg.downscale_to_zero_delay_s
            else:
                delay = cfg.downscale_delay_s
                if curr_target != 1:
                    desired = max(1, desired)
            if self._since is None:
                self._since = now
            if now - self._since + eps >= delay:
                self._counter, self._since = 0, None
                decision = desired
        else:
            self._counter, self._since = 0, None
        return decision

    def __call__(self, now: float, current: int, curr_target: int,
                 total_ongoing: float) -> int:
        """The new target: the wrapped default policy, then Ray's bounds."""
        cfg = self.cfg
        if current == 0 and total_ongoing > 0:  # cold-start fast path
            out = max(math.ceil(1 * cfg.upscaling_factor), curr_target)
        else:
            scaled = ray_scaling_factors(self.desired(current, total_ongoing, curr_target),
                                         current, cfg)
            if current == 0 and scaled > 0:
                out = scaled
            else:
                out = self._delay(max(0, scaled), curr_target, now)
        return min(max(out, cfg.min_replicas), cfg.max_replicas)


def ray_tuned_targets(profile: Profile, mean_prompt: float, mean_output: float,
                      ttft_slo_ms: float, itl_slo_ms: float) -> tuple[float, float]:
    """``target_ongoing_requests`` for (prefill, decode) from a one-replica load test.

    Prefill: the most prompts of the mean length whose batched prefill (plus the KV hand-off)
    still ends within the TTFT SLO. Decode: the batch the ITL SLO allows at the mean context
    (prompt + half the output), within the KV capacity. The decode replica is the ingress
    in this app, so its ongoing requests also include those still prefilling: the decode
    target is raised by the prefill share of a request's life (unloaded TTFT vs decode time).
    """
    mean_prompt, mean_output = max(mean_prompt, 1.0), max(mean_output, 1.0)
    k = 1
    while (k < 4096 and profile.prefill_ms((k + 1) * mean_prompt)
           + profile.transfer_ms(mean_prompt) <= ttft_slo_ms):
        k += 1
    context = mean_prompt + mean_output / 2
    batch = profile.max_decode_batch(context, itl_slo_ms)
    batch = max(min(batch, int(profile.kv.capacity_tokens // (mean_prompt + mean_output))), 1)
    decode_s = mean_output * profile.itl_ms(batch, context) / 1e3
    ttft_s = (profile.prefill_ms(mean_prompt) + profile.transfer_ms(mean_prompt)
              + profile.itl_ms(batch, context)) / 1e3
    ingress_share = (decode_s + ttft_s) / max(decode_s, 1e-9)
    return float(k), float(batch) * ingress_share


# --- Dynamo SLA planner ---------------------------------------------------------------------


@dataclass(frozen=True)
class DynamoConfig:
    """``SLAPlannerDefaults`` where they apply; SLOs and budget are the benchmark's."""

    ttft_slo_ms: float = 500.0  # Dynamo's default ttft 0.5 s
    itl_slo_ms: float = 50.0  # Dynamo's default itl 0.05 s
    adjustment_interval_s: float = 180.0
    min_endpoint: int = 1
    max_gpu_budget: float = 8.0
    prefill_engine_num_gpu: float = 1.0
    decode_engine_num_gpu: float = 1.0


@dataclass(frozen=True)
class IntervalObservation:
    """What the planner reads from Prometheus for the last interval."""

    num_req: float  # requests in the interval
    isl: float  # mean input length
    osl: float  # mean output length
    ttft_ms: float | None = None  # mean observed TTFT
    itl_ms: float | None = None  # mean observed ITL
    request_duration_s: float | None = None  # mean request duration


def dynamo_prefill_thpt(profile: Profile, isl: float) -> float:
    """Prefill tokens/s per engine at this ISL, profiled one request at a time (Dynamo's
    ``prefill_thpt_per_gpu`` = ISL / TTFT)."""
    isl = max(isl, 1.0)
    return isl / profile.prefill_ms(isl) * 1e3


def dynamo_decode_thpt(profile: Profile, itl_ms: float, context: float) -> float:
    """Decode tokens/s per engine at the largest load whose ITL stays within ``itl_ms``
    (``find_best_throughput_per_gpu``: the highest KV load meeting the ITL, else the
    lowest), with the load bounded by the KV capacity."""
    context = max(context, 1.0)
    top = max(min(profile.max_num_seqs, int(profile.kv.capacity_tokens // context)), 1)
    best = 1
    for b in range(top, 0, -1):
        if profile.itl_ms(b, context) <= itl_ms:
            best = b
            break
    return best / profile.itl_ms(best, context) * 1e3


class DynamoPlanner:
    """The SLA planner's ``make_adjustments`` with a constant load predictor."""

    def __init__(self, profile: Profile, cfg: DynamoConfig):
        self.profile, self.cfg = profile, cfg
        self.p_correction = 1.0
        self.d_correction = 1.0

    def plan(self, obs: IntervalObservation, num_p: int, num_d: int) -> tuple[int, int]:
        cfg, p = self.cfg, self.profile
        interval = cfg.adjustment_interval_s
        if obs.num_req <= 0:  # Dynamo's averages are NaN then: it logs and skips the round
            return num_p, num_d
        context = obs.isl + obs.osl / 2
        # Correction factors (skipped when the interval saw no latency: keep the last).
        if obs.ttft_ms is not None:
            self.p_correction = obs.ttft_ms / max(p.prefill_ms(obs.isl), 1e-9)
        if obs.itl_ms is not None and obs.request_duration_s is not None and num_d > 0:
            concurrency = obs.num_req / num_d * obs.request_duration_s / interval
            self.d_correction = obs.itl_ms / p.itl_ms(max(concurrency, 1.0), context)
        prefill_load = obs.num_req * obs.isl / interval * min(1.0, self.p_correction)
        next_p = math.ceil(prefill_load / dynamo_prefill_thpt(p, obs.isl)
                           / cfg.prefill_engine_num_gpu - 1e-9)
        corrected_itl = cfg.itl_slo_ms / max(self.d_correction, 1e-9)
        decode_thpt = dynamo_decode_thpt(p, corrected_itl, context)
        next_d = math.ceil(obs.num_req * obs.osl / interval / decode_thpt
                           / cfg.decode_engine_num_gpu - 1e-9)
        next_p, next_d = max(next_p, cfg.min_endpoint), max(next_d, cfg.min_endpoint)
        total = next_p * cfg.prefill_engine_num_gpu + next_d * cfg.decode_engine_num_gpu
        if total > cfg.max_gpu_budget:
            scale = cfg.max_gpu_budget / total
            next_p = max(cfg.min_endpoint, round(next_p * scale))
            next_d = max(cfg.min_endpoint, round(
                (cfg.max_gpu_budget - next_p * cfg.prefill_engine_num_gpu)
                / cfg.decode_engine_num_gpu))
        return next_p, next_d
