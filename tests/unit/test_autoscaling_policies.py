"""Autoscaling math on synthetic contexts: sizing, the coordinator's rules, the Ray adapters."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from autoscaling import signals as sig
from autoscaling.coordinator import Coordinator
from autoscaling.policies import PDAppPolicy, PhasePolicy
from autoscaling.profile_model import Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.sizing import DecodeSignals, PrefillSignals, decode_demand, prefill_demand

# A made-up but self-consistent profile: 1 ms per 10 prompt tokens (10k tok/s at 1024-token
# steps), ITL = 10 ms + 1 ms per sequence + 0.001 ms per sequence x context token.
PROFILE = Profile(
    name="unit", model="unit", hardware="unit", engine="unit", source="hand-written for tests",
    max_num_batched_tokens=1024, max_num_seqs=64, startup_s=20,
    prefill=[{"tokens": 128, "ms": 12.8}, {"tokens": 1024, "ms": 102.4}],
    decode=[{"batch": b, "context": c, "itl_ms": 10 + b + 0.001 * b * c}
            for b in (1, 8, 32) for c in (128, 1024)],
    kv={"bytes_per_token": 1000, "capacity_tokens": 100_000,
        "transfer": [{"bytes": 1_000_000, "ms": 2.0}, {"bytes": 3_000_000, "ms": 4.0}]},
)


def settings(**kw) -> AutoscalingSettings:
    base = dict(enabled=True, ttft_slo_ms=1000, itl_slo_ms=50,
                prefill={"min_replicas": 1, "max_replicas": 4},
                decode={"min_replicas": 1, "max_replicas": 4},
                upscale_cooldown_s=5, downscale_cooldown_s=60, downscale_stable_s=30)
    base.update(kw)
    return AutoscalingSettings.model_validate(base)


# --- profile ------------------------------------------------------------------------------------

def test_profile_interpolates_measured_points():
    assert PROFILE.prefill_ms(128) == pytest.approx(12.8)
    assert PROFILE.prefill_ms(576) == pytest.approx(57.6)
    assert PROFILE.prefill_ms(2048) == pytest.approx(204.8)  # two full steps
    assert PROFILE.prefill_tokens_per_s == pytest.approx(10_000)
    assert PROFILE.itl_ms(8, 1024) == pytest.approx(10 + 8 + 8 * 1.024, rel=1e-6)
    # ITL(32, 1024) = 74.8 > 50; ITL(24, 1024) = 58.6; ITL(19, 1024) = 48.5
    assert PROFILE.max_decode_batch(1024, 50) == 19
    assert PROFILE.transfer_ms(2000) == pytest.approx(3.0)  # 1 ms fixed + 1 ms per MB


def test_committed_profiles_load():
    from autoscaling.profile_model import PROFILE_DIR

    for path in PROFILE_DIR.glob("*.json"):
        p = Profile.load(path)
        assert p.prefill_tokens_per_s > 0 and p.itl_ms(1, 128) > 0, path


def test_unknown_profile_names_the_committed_ones():
    with pytest.raises(FileNotFoundError, match="committed profiles"):
        Profile.load("no-such-profile")


# --- sizing -------------------------------------------------------------------------------------

def test_prefill_demand_is_arrivals_plus_queue_over_capacity():
    s = PrefillSignals(queued_tokens=0, arrival_tokens_per_s=8000, mean_prompt_tokens=500)
    assert prefill_demand(s, PROFILE, 1000, 0.8, 1).replicas == pytest.approx(1.0)
    # 5000 queued tokens must drain within the wait budget: 1000 - 50 (prefill) - 1.5 ms
    queued = PrefillSignals(queued_tokens=5000, arrival_tokens_per_s=0, mean_prompt_tokens=500)
    wait_s = (1000 - 50 - 1.5) / 1e3
    assert prefill_demand(queued, PROFILE, 1000, 0.8, 1).replicas == pytest.approx(
        5000 / wait_s / 10_000)


def test_prefill_ttft_breach_with_queue_asks_one_more():
    s = PrefillSignals(queued_tokens=100, arrival_tokens_per_s=100, mean_prompt_tokens=100,
                       ttft_p90_ms=1500)
    assert prefill_demand(s, PROFILE, 1000, 0.8, 2).replicas == 3
    # A breach with nothing queued (one huge prompt) is not a capacity problem.
    idle = PrefillSignals(ttft_p90_ms=5000)
    assert prefill_demand(idle, PROFILE, 1000, 0.8, 2).replicas == 0


def test_decode_demand_itl_and_kv_bounds():
    # At 1024 context ITL allows 19 sequences per replica: 19 / 48.456 ms = 392 tok/s.
    per_replica = 19 * 1e3 / (10 + 19 + 19 * 1.024)
    s = DecodeSignals(sequences=38, generation_tokens_per_s=2 * per_replica,
                      mean_context_tokens=1024, kv_usage=0.1)
    assert decode_demand(s, PROFILE, 50, 0.8, 1).replicas == pytest.approx(2.0)
    # The same rate sized at either size: the running-sequence count does not feed back.
    more = DecodeSignals(sequences=90, generation_tokens_per_s=2 * per_replica,
                         mean_context_tokens=1024, kv_usage=0.1)
    assert decode_demand(more, PROFILE, 50, 0.8, 1).replicas == pytest.approx(2.0)
    # KV: 60 x 4000 tokens = 240k tokens / (100k x 0.8) = 3 replicas.
    kv = DecodeSignals(sequences=60, mean_context_tokens=4000)
    assert decode_demand(kv, PROFILE, 10_000, 0.8, 1).replicas == pytest.approx(3.0)
    # The engines' reported fill counts too: 2 replicas at 100% want 2.5 at an 80% target.
    seen = DecodeSignals(sequences=1, mean_context_tokens=10, kv_usage=1.0)
    assert decode_demand(seen, PROFILE, 50, 0.8, 2).replicas == pytest.approx(2.5)


def test_decode_itl_breach_asks_one_more():
    s = DecodeSignals(sequences=10, mean_context_tokens=100, itl_p90_ms=80)
    assert decode_demand(s, PROFILE, 50, 0.8, 1).replicas == 2


# --- coordinator --------------------------------------------------------------------------------

def test_scale_up_is_immediate_then_rate_limited_by_cooldown_and_step():
    c = Coordinator(settings(max_step_up=1))
    assert c.decide(0, {"prefill": 1}, {"prefill": 3.2}).targets == {"prefill": 2}
    assert c.decide(2, {"prefill": 2}, {"prefill": 3.2}).targets == {"prefill": 2}  # cooldown
    assert c.decide(6, {"prefill": 2}, {"prefill": 3.2}).targets == {"prefill": 3}


def test_never_outside_min_max():
    c = Coordinator(settings())
    assert c.decide(0, {"decode": 1}, {"decode": 50}).targets == {"decode": 3}  # step 2
    assert c.decide(10, {"decode": 3}, {"decode": 50}).targets == {"decode": 4}  # max 4
    c2 = Coordinator(settings(downscale_stable_s=0, downscale_cooldown_s=0))
    assert c2.decide(0, {"decode": 1}, {"decode": 0}).targets == {"decode": 1}  # min 1


def test_scale_down_only_after_stable_period_and_cooldown():
    c = Coordinator(settings())
    c.decide(0, {"decode": 1}, {"decode": 2})  # up at t=0
    targets = [c.decide(t, {"decode": 2}, {"decode": 0.5}).targets["decode"]
               for t in range(1, 120)]
    first_down = 1 + targets.index(1)
    # Demand fell at t=1: it must stay low for 30 s, and 60 s must pass since the scale-up.
    assert first_down == 60


def test_hysteresis_band_keeps_size_when_demand_is_near_it():
    c = Coordinator(settings(downscale_stable_s=0, downscale_cooldown_s=0))
    # 1.7 replicas of demand x 1.25 headroom = 2.1 -> does not fit in 2: stay at 3.
    assert c.decide(100, {"prefill": 3}, {"prefill": 1.7}).targets == {"prefill": 3}
    assert c.decide(101, {"prefill": 3}, {"prefill": 1.5}).targets == {"prefill": 2}


def test_down_step_limited():
    c = Coordinator(settings(downscale_stable_s=0, downscale_cooldown_s=0,
                             decode={"min_replicas": 1, "max_replicas": 8}))
    assert c.decide(100, {"decode": 6}, {"decode": 0.1}).targets == {"decode": 5}


def test_no_flapping_on_steady_noisy_load_for_ten_minutes():
    """Demand hovering around 2.3 replicas (+-15 % noise) every second for 10 min: one size."""
    c = Coordinator(settings())
    rng = random.Random(0)
    cur = {"prefill": 3, "decode": 2}
    sizes = []
    for t in range(600):
        demand = {"prefill": 2.3 * rng.uniform(0.85, 1.15), "decode": 1.6 * rng.uniform(0.85, 1.15)}
        cur = c.decide(float(t), cur, demand).targets
        sizes.append(tuple(cur.values()))
    assert set(sizes) == {(3, 2)}


def test_pd_ratio_bounds():
    c = Coordinator(settings(pd_ratio_max=1.0))
    # Prefill wants 3, decode 1: decode is raised to keep P:D <= 1.
    assert c.decide(0, {"prefill": 1, "decode": 1}, {"prefill": 3, "decode": 1}).targets == {
        "prefill": 3, "decode": 3}
    c = Coordinator(settings(pd_ratio_min=0.5, prefill={"min_replicas": 1, "max_replicas": 1}))
    # Decode wants 4 but prefill cannot exceed 1: decode capped at 2 to keep P:D >= 0.5.
    assert c.decide(0, {"prefill": 1, "decode": 1}, {"prefill": 1, "decode": 4}).targets == {
        "prefill": 1, "decode": 2}


def test_budget_grants_prefill_first_and_never_blocks_shrinking():
    c = Coordinator(settings(budget=4, prefill={"min_replicas": 1, "max_replicas": 4,
                                                "replica_cost": 1},
                             decode={"min_replicas": 1, "max_replicas": 4,
                                     "replica_cost": 1}))
    d = c.decide(0, {"prefill": 1, "decode": 1}, {"prefill": 3, "decode": 3})
    assert d.targets == {"prefill": 3, "decode": 1} and "budget" in d.reasons
    # Already over a lowered budget: decode is shrunk first.
    c2 = Coordinator(settings(budget=2))
    d2 = c2.decide(0, {"prefill": 2, "decode": 2}, {"prefill": 2, "decode": 2})
    assert d2.targets == {"prefill": 1, "decode": 1}


def test_settings_validation():
    with pytest.raises(ValidationError, match="allow_scale_to_zero"):
        settings(prefill={"min_replicas": 0, "max_replicas": 2})
    with pytest.raises(ValidationError, match="max_replicas"):
        settings(decode={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="budget"):
        settings(budget=1)
    with pytest.raises(ValidationError, match="pd_ratio_max"):
        settings(pd_ratio_min=2, pd_ratio_max=1)


def test_app_config_checks_start_size_within_bounds():
    from app.config import AppConfig

    with pytest.raises(ValidationError, match="num_replicas"):
        AppConfig.model_validate({"model": {"path": "m", "served_model_name": "m"},
                                  "decode": {"num_replicas": 3},
                                  "autoscaling": {"enabled": True}})


# --- signals ------------------------------------------------------------------------------------

def test_signal_window_rates_percentiles_and_expiry():
    now = [0.0]
    w = sig.SignalWindow(window_s=10, clock=lambda: now[0])
    w.observe_ttft([0.1, 0.2, 0.3, 0.4, 1.0])
    w.observe_arrival(500)
    w.observe_arrival(1500)
    engine = {"num_running_reqs": 2, "num_waiting_reqs": 1, "kv_cache_usage": 0.5,
              "kv_num_blocks": 100, "kv_block_size": 16, "prompt_tokens_computed": 0,
              "generation_tokens": 0}
    w.snapshot(engine, 0)
    now[0] = 4.0
    snap = w.snapshot({**engine, "prompt_tokens_computed": 2000, "generation_tokens": 40}, 700)
    assert snap[sig.TTFT_P90] == 1000 and snap[sig.TTFT_P50] == 300
    assert snap[sig.ARRIVAL_TOKENS_PER_S] == pytest.approx(2000 / 4)
    assert snap[sig.MEAN_PREFILL_TOKENS] == 1000
    assert snap[sig.PROMPT_TOKENS_PER_S] == pytest.approx(500)
    assert snap[sig.GENERATION_TOKENS_PER_S] == pytest.approx(10)
    assert snap[sig.CONTEXT_TOKENS] == pytest.approx(0.5 * 100 * 16 / 2)
    assert snap[sig.QUEUED_PREFILL_TOKENS] == 700 and snap[sig.WAITING] == 1
    assert all(isinstance(v, float) for v in snap.values())  # Ray takes numbers only
    now[0] = 20.0
    late = w.snapshot(engine, 0)
    assert late[sig.TTFT_SAMPLES] == 0 and late[sig.ARRIVAL_TOKENS_PER_S] == 0


def test_pool_signals_sum_and_weight():
    m = {sig.QUEUED_PREFILL_TOKENS: {"a": 100, "b": 300},
         sig.ARRIVAL_TOKENS_PER_S: {"a": 10, "b": 0},
         sig.MEAN_PREFILL_TOKENS: {"a": 400, "b": 0},
         sig.TTFT_P90: {"a": 900, "b": 5000}, sig.TTFT_SAMPLES: {"a": 3, "b": 0},
         sig.RUNNING: {"a": 3, "b": 1}, sig.WAITING: {"a": 1, "b": 0},
         sig.CONTEXT_TOKENS: {"a": 100, "b": 500}, sig.KV_USAGE: {"a": 0.2, "b": 0.4}}
    p = sig.prefill_signals(m)
    assert (p.queued_tokens, p.arrival_tokens_per_s, p.mean_prompt_tokens) == (400, 10, 400)
    assert p.ttft_p90_ms == 900  # b saw no request: its stale p90 is ignored
    d = sig.decode_signals(m)
    assert d.sequences == 5 and d.mean_context_tokens == pytest.approx(200)
    assert d.kv_usage == pytest.approx(0.3) and d.itl_p90_ms is None


# --- Ray adapters (duck-typed contexts, as Ray's AutoscalingContext) ----------------------------

def ctx(phase: str, current: int, metrics: dict, s: AutoscalingSettings, now: float = 0.0,
        target: int | None = None):
    kwargs = {"phase": phase, "settings": s.model_dump()}
    return SimpleNamespace(current_num_replicas=current, aggregated_metrics=metrics,
                           current_time=now, target_num_replicas=target or current,
                           config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs)))


def test_phase_policy_scales_prefill_on_queued_tokens(tmp_path):
    path = tmp_path / "unit.json"
    PROFILE.dump(path)
    s = settings(profile=str(path))
    policy = PhasePolicy(phase="prefill", settings=s.model_dump())
    burst = {sig.QUEUED_PREFILL_TOKENS: {"r1": 20_000}, sig.ARRIVAL_TOKENS_PER_S: {"r1": 5000},
             sig.MEAN_PREFILL_TOKENS: {"r1": 1000}}
    target, state = policy(ctx("prefill", 1, burst, s))
    assert target == 3 and state["demand"] > 2


def test_app_policy_sizes_both_phases_and_ignores_foreign_deployments(tmp_path):
    path = tmp_path / "unit.json"
    PROFILE.dump(path)
    s = settings(profile=str(path), pd_ratio_max=2.0)
    policy = PDAppPolicy()
    burst = {sig.QUEUED_PREFILL_TOKENS: {"p1": 20_000}, sig.ARRIVAL_TOKENS_PER_S: {"p1": 5000},
             sig.MEAN_PREFILL_TOKENS: {"p1": 1000}}
    idle_decode = {sig.RUNNING: {"d1": 2}, sig.CONTEXT_TOKENS: {"d1": 500},
                   sig.KV_USAGE: {"d1": 0.05}}
    foreign = SimpleNamespace(current_num_replicas=1, aggregated_metrics={}, current_time=0,
                              config=SimpleNamespace(policy=None))
    targets, states = policy({"P": ctx("prefill", 1, burst, s),
                              "D": ctx("decode", 1, idle_decode, s), "Router": foreign})
    assert targets == {"P": 3, "D": 2}  # prefill first; decode raised to keep P:D <= 2
    assert set(states) == {"P", "D"}


def test_replicas_still_starting_are_not_asked_for_again(tmp_path):
    """A TTFT breach while the added replica starts (running 1, target 2) keeps target 2."""
    path = tmp_path / "unit.json"
    PROFILE.dump(path)
    s = settings(profile=str(path), upscale_cooldown_s=0)
    policy = PhasePolicy(phase="prefill", settings=s.model_dump())
    breach = {sig.QUEUED_PREFILL_TOKENS: {"r1": 500}, sig.ARRIVAL_TOKENS_PER_S: {"r1": 100},
              sig.MEAN_PREFILL_TOKENS: {"r1": 100}, sig.TTFT_P90: {"r1": 3000},
              sig.TTFT_SAMPLES: {"r1": 5}}
    assert policy(ctx("prefill", 1, breach, s, now=0))[0] == 2
    for t in range(1, 30):
        assert policy(ctx("prefill", 1, breach, s, now=t, target=2))[0] == 2
    assert policy(ctx("prefill", 2, breach, s, now=31, target=2))[0] == 3


def test_each_phase_can_size_with_its_own_hardware_profile():
    """Prefill on H100, decode on L40S: each phase's demand uses its own profile."""
    settings = {"enabled": True, "profile": "h100-llama-3.1-8b",
                "decode": {"min_replicas": 1, "max_replicas": 4,
                           "profile": "l40s-llama-3.1-8b"}}
    s = AutoscalingSettings.model_validate(settings)
    assert s.profile_for("prefill") == "h100-llama-3.1-8b"
    assert s.profile_for("decode") == "l40s-llama-3.1-8b"
    assert PhasePolicy("decode", settings).sizer.profile.name == \
        Profile.load("l40s-llama-3.1-8b").name
    assert PhasePolicy("prefill", settings).sizer.profile.name == \
        Profile.load("h100-llama-3.1-8b").name
    app = PDAppPolicy()
    app._setup({"settings": settings})
    assert app._sizers["decode"].profile.name != app._sizers["prefill"].profile.name
