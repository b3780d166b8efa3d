"""The autoscaling simulator: event order, engine timing against the profile, start-up and
draining, the policy in the loop (no flapping, prefill first on a burst), the baselines' math."""

from __future__ import annotations

import json
import math
import random

import pytest

from autoscaling import signals as sig
from autoscaling.baselines import (
    DynamoConfig,
    DynamoPlanner,
    IntervalObservation,
    RayDefaultConfig,
    RayDefaultPolicy,
    dynamo_decode_thpt,
    dynamo_prefill_thpt,
    ray_scaling_factors,
)
from autoscaling.profile_model import PDDecode, Profile
from autoscaling.settings import AutoscalingSettings
from autoscaling.sim.cluster import SimConfig, simulate
from autoscaling.sim.drivers import FixedDriver, PDDriver, RayDefaultDriver
from autoscaling.sim.engines import (
    DRAINING,
    RUNNING,
    STOPPED,
    AggregatedReplica,
    DecodeReplica,
    PrefillReplica,
    mixed_step_ms,
)
from autoscaling.sim.events import EventLoop
from autoscaling.sim.pool import Pool
from autoscaling.sim.report import summarize
from autoscaling.sim.telemetry import weighted_percentile
from autoscaling.sim.workload import load_trace, make_requests, peak_window

# Round numbers: prefill 0.1 ms per prompt token (10k tok/s in 1024-token steps); decode ITL
# 10 ms + 1 ms per running sequence, whatever the context; KV hand-off 1 ms + 1 ms per MB
# (1 kB per token); replicas take 20 s to start.
PROFILE = Profile(
    name="unit", model="unit", hardware="unit", engine="unit", source="hand-written for tests",
    max_num_batched_tokens=1024, max_num_seqs=64, startup_s=20,
    prefill=[{"tokens": 128, "ms": 12.8}, {"tokens": 1024, "ms": 102.4}],
    decode=[{"batch": b, "context": c, "itl_ms": 10 + b}
            for b in (1, 8, 32) for c in (128, 1024)],
    kv={"bytes_per_token": 1000, "capacity_tokens": 100_000,
        "transfer": [{"bytes": 1_000_000, "ms": 2.0}, {"bytes": 3_000_000, "ms": 4.0}]},
)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profiles") / "unit.json"
    PROFILE.dump(path)
    return str(path)


def settings(profile_path: str, **kw) -> AutoscalingSettings:
    base = dict(enabled=True, profile=profile_path, ttft_slo_ms=1000, itl_slo_ms=50,
                prefill={"min_replicas": 1, "max_replicas": 4},
                decode={"min_replicas": 1, "max_replicas": 4},
                aggregated={"min_replicas": 1, "max_replicas": 4})
    base.update(kw)
    return AutoscalingSettings.model_validate(base)


def poisson(rate: float, duration: float, prompt: int, output: int, seed: int = 0,
            start: float = 0.0) -> list[tuple[float, int, int]]:
    rng, t, rows = random.Random(seed), start, []
    while True:
        t += rng.expovariate(rate)
        if t >= start + duration:
            return rows
        rows.append((t, prompt, output))


# --- event loop ---------------------------------------------------------------------------------

def test_events_run_in_time_order_and_fifo_at_equal_times():
    loop, seen = EventLoop(), []
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    loop.at(1.0, seen.append, "b")  # same time: scheduling order
    loop.at(1.5, lambda: loop.after(0.0, seen.append, "nested"))
    loop.at(9.0, seen.append, "late")
    loop.run(until=5.0)
    assert seen == ["a", "b", "nested", "c"]
    assert loop.now == 5.0 and len(loop) == 1
    loop.at(0.0, seen.append, "past")  # never before now
    loop.run()
    assert seen[-2:] == ["past", "late"] and loop.now == 9.0


# --- engines ------------------------------------------------------------------------------------

def _running(rep):
    rep.become_ready()
    return rep


def test_prefill_steps_take_profile_time_and_chunk_long_prompts():
    loop, done = EventLoop(), []
    rep = _running(PrefillReplica("p", PROFILE, loop, 10, lambda r: done.append((r.id,
                                                                                    loop.now))))
    for r in make_requests([(0.0, 500, 1), (0.0, 300, 1), (0.0, 2000, 1)]):
        rep.enqueue(r)
    loop.run()
    # Step 1 packs 500 + 300 + 224 of the long prompt (1024 tokens, 102.4 ms); then 1024
    # (102.4 ms), then the last 752 (75.2 ms).
    assert [i for i, _ in done] == [0, 1, 2]
    assert done[0][1] == pytest.approx(0.1024) and done[1][1] == pytest.approx(0.1024)
    assert done[2][1] == pytest.approx(0.1024 + 0.1024 + 0.0752)
    assert rep.prompt_tokens_computed == 2800 and rep.queued_tokens == 0


def test_pd_request_times_follow_the_profile():
    s = AutoscalingSettings(enabled=True, profile="unused")
    reqs = make_requests([(1.0, 500, 5)])
    res = simulate(reqs, SimConfig(PROFILE, s), FixedDriver({"prefill": 1, "decode": 1}))
    r = reqs[0]
    assert r.prefill_done_t == pytest.approx(1.0 + 0.050)  # 500 tokens x 0.1 ms
    # + KV hand-off 1.5 ms + one decode step (10 + 1 ms) for the first token
    assert r.first_token_t == pytest.approx(1.0 + 0.050 + 0.0015 + 0.011)
    assert r.tpot_ms == pytest.approx(11.0) and r.finished_t == pytest.approx(
        r.first_token_t + 4 * 0.011)
    assert res.horizon_s == pytest.approx(r.finished_t)
    assert res.replica_seconds["prefill"] == pytest.approx(r.finished_t)


def test_pd_decode_slows_while_the_shared_host_prefills():
    """A profile with ``pd_decode`` (CPU: both engines on one host) slows decode steps by its
    idle factor, and by the busy factor while the prefill engine computes."""
    s = AutoscalingSettings(enabled=True, profile="unused")
    pd = PROFILE.model_copy(update={"pd_decode": PDDecode(
        points=[{"batch": 1, "context": 100, "idle_ms": 15.0, "busy_ms": 30.0}],
        idle_factor=1.5, busy_factor=2.0)})
    alone = make_requests([(1.0, 500, 5)])
    simulate(alone, SimConfig(pd, s), FixedDriver({"prefill": 1, "decode": 1}))
    assert alone[0].tpot_ms == pytest.approx(1.5 * 11.0)
    # A second, long prompt keeps the prefill engine computing for 10 s while the first
    # request decodes: its steps take idle x busy factor.
    both = make_requests([(1.0, 500, 5), (1.06, 100_000, 1)])
    simulate(both, SimConfig(pd, s), FixedDriver({"prefill": 1, "decode": 1}))
    assert both[0].tpot_ms == pytest.approx(1.5 * 2.0 * 11.0)


def test_pd_prefill_slows_while_the_shared_host_decodes():
    s = AutoscalingSettings(enabled=True, profile="unused")
    pd = PROFILE.model_copy(update={"pd_decode": PDDecode(
        points=[{"batch": 1, "context": 100, "idle_ms": 11.0, "busy_ms": 11.0}],
        idle_factor=1.0, busy_factor=1.0, prefill_slowdown=2.0)})
    # The first request decodes 200 tokens (~2.2 s); the second's prompt (500 tokens, 50 ms
    # alone) is computed meanwhile, at twice the time.
    reqs = make_requests([(1.0, 100, 200), (1.1, 500, 1)])
    simulate(reqs, SimConfig(pd, s), FixedDriver({"prefill": 1, "decode": 1}))
    assert reqs[1].prefill_done_t - reqs[1].arrival == pytest.approx(2 * 0.050)


def test_decode_batches_share_steps_and_respect_kv_capacity():
    loop, finished = EventLoop(), []
    small = PROFILE.model_copy(update={"kv": PROFILE.kv.model_copy(
        update={"capacity_tokens": 2_000})})
    rep = _running(DecodeReplica("d", small, loop, 10, finished.append))
    reqs = make_requests([(0.0, 900, 3), (0.0, 900, 3), (0.0, 900, 3)])
    for r in reqs:
        r.prefill_done_t = 0.0
        rep.assign(r)
        rep.kv_arrived(r)
    loop.run()
    # Two fit (2 x 903 reserved <= 2000): 3 steps at batch 2 (12 ms); the third waits.
    assert reqs[0].finished_t == pytest.approx(0.036) and reqs[1].finished_t == pytest.approx(
        0.036)
    assert reqs[2].first_token_t == pytest.approx(0.036 + 0.011)
    assert rep.running == 0 and rep.kv_tokens == 0 and rep.kv_reserved == 0
    assert rep.generation_tokens == 9 and rep.ongoing() == 0


def test_aggregated_replica_mixes_prefill_chunks_with_decodes():
    loop, finished = EventLoop(), []
    rep = _running(AggregatedReplica("a", PROFILE, loop, 10, finished.append))
    a, b = make_requests([(0.0, 100, 3), (0.0, 2000, 2)])
    rep.enqueue(a)
    rep.enqueue(b)
    loop.run()
    # Step 1: 100 + 924 prompt tokens (102.4 ms): a's first token. Step 2: a decodes, b's
    # next 1023 tokens ride along (mixed step), step 3: a's last token and b's last chunk.
    step2 = mixed_step_ms(PROFILE, 1023, 1, 101)
    assert a.first_token_t == pytest.approx(0.1024)
    assert step2 == pytest.approx(102.3 + 11 - 11)  # the weights pass is shared
    assert a.finished_t > a.first_token_t and b.done and len(finished) == 2
    assert rep.kv_tokens == 0 and rep.queued_tokens == 0


# --- pool: start-up, draining, replica-seconds ----------------------------------------------

def _pool(loop):
    return Pool("prefill", lambda rid: PrefillReplica(rid, PROFILE, loop, 10), loop,
                startup_s=PROFILE.startup_s)


def test_new_replica_serves_only_after_startup_and_costs_from_the_request():
    loop = EventLoop()
    pool = _pool(loop)
    pool.start(1)
    loop.at(5.0, pool.set_target, 2)
    loop.run(until=24.9)
    assert pool.num_running == 1 and pool.target == 2
    loop.run(until=25.1)
    assert pool.num_running == 2
    assert pool.replica_seconds(until=30.0) == pytest.approx(30.0 + 25.0)


def test_removed_replica_drains_its_work_and_takes_no_new_work():
    loop = EventLoop()
    pool = _pool(loop)
    pool.start(2)
    old, new = pool.replicas
    for r in make_requests([(0.0, 1000, 1), (0.0, 1000, 1)]):
        new.enqueue(r)
    loop.run(until=0.01)
    pool.set_target(1)  # the newest running replica goes: Ray's order
    assert new.state == DRAINING and pool.route() is old
    loop.run()
    assert new.state == STOPPED and new.stopped_t == pytest.approx(0.2)  # 2 x 100 ms of work
    assert old.state == RUNNING and pool.target == 1
    assert pool.replica_seconds(until=1.0) == pytest.approx(1.0 + 0.2)


def test_cancelled_start_costs_only_until_cancelled():
    loop = EventLoop()
    pool = _pool(loop)
    pool.start(1)
    pool.set_target(3)
    loop.at(4.0, pool.set_target, 1)
    loop.run()
    assert pool.num_running == 1 and pool.target == 1 and len(pool.live) == 1
    assert pool.replica_seconds(until=10.0) == pytest.approx(10.0 + 2 * 4.0)


# --- signals ------------------------------------------------------------------------------------

def test_weighted_percentile_matches_the_expanded_nearest_rank():
    samples = [(12.0, 3), (10.0, 5), (30.0, 2)]
    expanded = sorted(v for v, n in samples for _ in range(n))
    for q in (0.0, 0.5, 0.9, 0.99):
        assert weighted_percentile(samples, q) == sig.percentile(expanded, q)
    assert weighted_percentile([], 0.9) == 0.0


def test_replicas_report_the_production_signal_keys(profile_path):
    s = settings(profile_path)
    reqs = make_requests(poisson(5, 20, 400, 10))
    seen = {}

    class Probe(FixedDriver):
        def decide(self, view):
            for phase in ("prefill", "decode"):
                seen[phase] = view.metrics(phase)
            return {}

    simulate(reqs, SimConfig(PROFILE, s), Probe({"prefill": 1, "decode": 1}))
    keys = {v for k, v in vars(sig).items() if k.isupper() and isinstance(v, str)}
    assert set(seen["prefill"]) == keys and set(seen["decode"]) == keys
    assert seen["prefill"][sig.ARRIVAL_TOKENS_PER_S]["prefill-1"] > 0
    assert seen["decode"][sig.ITL_SAMPLES]["decode-1"] > 0
    assert 0 < seen["decode"][sig.KV_USAGE]["decode-1"] < 1


# --- the policy in the loop -----------------------------------------------------------------

def _changes_after(res, t0: float) -> list:
    return [d for d in res.decisions if d[0] >= t0]


def test_steady_load_keeps_a_constant_replica_count_for_ten_minutes(profile_path):
    s = settings(profile_path)
    # 8k prompt tokens/s: 1 prefill replica of 10k tok/s at the 0.8 utilization target,
    # decode well within one. Cold start at 1+1, 2 minutes to settle, 10 steady minutes.
    for seed in (1, 2):
        reqs = make_requests(poisson(16, 720, 500, 20, seed=seed))
        res = simulate(reqs, SimConfig(PROFILE, s), PDDriver(s, ("prefill", "decode")))
        assert res.horizon_s > 720
        assert _changes_after(res, 120.0) == []
        assert [x.running for x in res.timelines["prefill"]][-1] == 2
        assert summarize(res, 1000, 50, warmup_s=120).attainment > 0.99


def test_steady_load_near_one_decode_replica_does_not_flap(profile_path):
    """Sizing decode on running sequences flapped here (they grow when a replica goes):
    sized on the token rate it holds."""
    s = settings(profile_path)
    # 720 generated tokens/s: one decode replica at batch ~26 (ITL ~36 ms, SLO 50 ms).
    reqs = make_requests(poisson(36, 720, 500, 20, seed=1))
    res = simulate(reqs, SimConfig(PROFILE, s), PDDriver(s, ("prefill", "decode")))
    assert len([d for d in _changes_after(res, 120.0) if d[1] == "decode"]) <= 1


def test_burst_scales_prefill_before_decode(profile_path):
    s = settings(profile_path, upscale_cooldown_s=5)
    rows = poisson(4, 60, 400, 40) + poisson(40, 120, 400, 40, seed=2, start=60)
    reqs = make_requests(rows)
    res = simulate(reqs, SimConfig(PROFILE, s), PDDriver(s, ("prefill", "decode")))
    ups = {}
    for t, phase, _ in res.decisions:
        ups.setdefault(phase, t)
    assert "prefill" in ups and "decode" in ups
    assert 60 < ups["prefill"] < ups["decode"]


def test_aggregated_layout_scales_one_pool(profile_path):
    s = settings(profile_path)
    reqs = make_requests(poisson(25, 120, 500, 20, seed=3))
    res = simulate(reqs, SimConfig(PROFILE, s, layout="aggregated"),
                   PDDriver(s, ("aggregated",)))
    assert set(res.timelines) == {"aggregated"}
    assert all(r.done for r in reqs) and res.decisions


# --- baselines ----------------------------------------------------------------------------------

def test_ray_default_desired_is_ongoing_over_target():
    pol = RayDefaultPolicy(RayDefaultConfig(target_ongoing_requests=4, upscale_delay_s=0,
                                            downscale_delay_s=0, max_replicas=10))
    assert pol.desired(current=2, total_ongoing=20, curr_target=2) == pytest.approx(5.0)
    assert pol(0.0, 2, 2, 20) == 5
    assert pol(1.0, 5, 5, 3) == 1  # ceil(0.75)
    assert ray_scaling_factors(2.2, 4, RayDefaultConfig(downscaling_factor=0.5)) == 3
    # a factor that would stall a downscale still steps down by one
    assert ray_scaling_factors(3.0, 4, RayDefaultConfig(downscaling_factor=0.1)) == 3


def test_ray_default_delays_need_continuous_wanting():
    pol = RayDefaultPolicy(RayDefaultConfig(target_ongoing_requests=2, max_replicas=10))
    assert pol(0.0, 1, 1, 6) == 1  # wants 3: the 30 s clock starts
    assert pol(29.0, 1, 1, 6) == 1
    assert pol(30.0, 1, 1, 6) == 3
    assert pol(40.0, 3, 3, 2) == 3  # wants 1: the 600 s clock starts
    assert pol(100.0, 3, 3, 12) == 3  # direction change resets it (and starts the up clock)
    assert pol(101.0, 3, 3, 2) == 3
    assert pol(700.0, 3, 3, 2) == 3  # 599 s of wanting down since 101
    assert pol(701.0, 3, 3, 2) == 1
    assert pol(702.0, 1, 1, 0) == 1  # min_replicas


def test_dynamo_planner_arithmetic():
    cfg = DynamoConfig(ttft_slo_ms=1000, itl_slo_ms=50, adjustment_interval_s=100,
                       max_gpu_budget=100)
    # prefill: 500-token prompts take 50 ms -> 10k tok/s; decode: ITL 10 + b ms <= 50 -> b=40
    assert dynamo_prefill_thpt(PROFILE, 500) == pytest.approx(10_000)
    assert dynamo_decode_thpt(PROFILE, 50, 600) == pytest.approx(40 / 50 * 1e3)
    planner = DynamoPlanner(PROFILE, cfg)
    obs = IntervalObservation(num_req=5000, isl=500, osl=100, ttft_ms=100.0, itl_ms=None)
    # prefill: 5000 x 500 / 100 s = 25k tok/s x min(1, 100/50) / 10k = 2.5 -> 3
    # decode: 5000 x 100 / 100 s = 5000 tok/s / 800 = 6.25 -> 7
    assert planner.plan(obs, 1, 1) == (3, 7)
    # TTFT below the profile (cache hits) scales prefill down: correction 25/50
    assert planner.plan(IntervalObservation(5000, 500, 100, ttft_ms=25.0), 3, 7)[0] == 2
    # an observed ITL twice the profile's halves the ITL target: b=15 at 25 ms
    # 10 decode replicas: concurrency 5000 / 10 x 5 s / 100 s = 25 -> profiled ITL 35 ms;
    # observed 70 ms -> correction 2 -> ITL target 25 ms -> batch 15 -> 600 tok/s per replica
    obs = IntervalObservation(5000, 500, 100, ttft_ms=100.0, itl_ms=70.0,
                              request_duration_s=5.0)
    _, d = DynamoPlanner(PROFILE, cfg).plan(obs, 3, 10)
    assert d == math.ceil(5000 * 100 / 100 / 600) == 9
    # budget: scaled down proportionally
    small = DynamoPlanner(PROFILE, DynamoConfig(adjustment_interval_s=100, itl_slo_ms=50,
                                                max_gpu_budget=5))
    assert small.plan(IntervalObservation(5000, 500, 100, ttft_ms=100.0), 1, 1) == (2, 3)
    assert small.plan(IntervalObservation(0, 0, 0), 2, 3) == (2, 3)  # nothing observed


def test_ray_default_driver_in_the_loop_waits_its_delay(profile_path):
    s = settings(profile_path)
    reqs = make_requests(poisson(30, 90, 500, 20, seed=4))
    drv = RayDefaultDriver(s, ("prefill", "decode"), {"prefill": 1.0, "decode": 50.0})
    res = simulate(reqs, SimConfig(PROFILE, s), drv)
    first_up = min(t for t, phase, _ in res.decisions if phase == "prefill")
    assert first_up >= 30.0  # upscale_delay_s


# --- workload and CLI ---------------------------------------------------------------------------

def test_trace_compression_and_peak_window(tmp_path):
    times = [0, 1, 2, 50, 50.5, 51, 51.5, 52, 100]
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{int(t // 60):02d}:{t % 60:06.3f},{10 + i},2" for i, t in
        enumerate(times)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n")
    reqs = load_trace(str(path), compress=2.0)
    assert [r.arrival for r in reqs][-1] == pytest.approx(50.0) and len(reqs) == 9
    peak = load_trace(str(path), peak_window_s=3.0)
    assert [r.prompt for r in peak] == [13, 14, 15, 16, 17]
    assert peak[0].arrival == 0.0
    assert peak_window([0.0, 1.0, 5.0], 1.0) == (0.0, 1.0)


def test_cli_prints_the_figures_and_plots(profile_path, tmp_path, capsys):
    from autoscaling.simulate import main

    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{int(t // 60):02d}:{t % 60:06.3f},400,20" for t, _, _ in
        poisson(10, 60, 1, 1, seed=5)]
    trace = tmp_path / "mini.csv"
    trace.write_text("\n".join(rows) + "\n")
    out_json, plot = tmp_path / "s.json", tmp_path / "r.png"
    assert main(["--trace", str(trace), "--profile", profile_path, "--policy", "pd",
                 "--ttft-slo-ms", "1000", "--itl-slo-ms", "50", "--max-replicas", "4",
                 "--plot", str(plot), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for word in ("SLO attainment", "goodput", "replica-seconds", "TTFT p50", "TPOT p50"):
        assert word in text
    assert plot.stat().st_size > 0 and json.loads(out_json.read_text())["requests"] > 0
