from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import AppConfig, parse_core_spec
from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S

CONFIGS = Path(__file__).resolve().parents[2] / "serve_configs"


def _app_args(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())["applications"][0]["args"]


def test_local_config_is_disaggregated_tiny_model_on_two_cores():
    cfg = AppConfig.model_validate(_app_args("local.yaml"))
    assert cfg.mode == "disaggregated"
    assert cfg.model.served_model_name == "tiny-llama"
    assert [name for name, _ in cfg.phases()] == ["prefill", "decode"]
    assert cfg.prefill.cpu_cores == ["0"] and cfg.decode.cpu_cores == ["1"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("local*.yaml")))
def test_local_configs_spin_as_the_tests_and_benches_do(name):
    cfg = AppConfig.model_validate(_app_args(name))
    assert cfg.engine_process.shm_busy_loop_s == SMALL_HOST_SHM_BUSY_LOOP_S


def test_local_aggregated_config():
    cfg = AppConfig.model_validate(_app_args("local_aggregated.yaml"))
    assert cfg.mode == "aggregated"
    assert [name for name, _ in cfg.phases()] == ["aggregated"]


def test_engine_kwargs_layer_shared_then_phase_then_connector():
    cfg = AppConfig.model_validate(
        {
            "model": {"path": "/m", "served_model_name": "m"},
            "engine_args": {"max_model_len": 1024, "block_size": 32},
            "decode": {"engine_args": {"max_model_len": 2048}},
        }
    )
    decode = cfg.engine_kwargs("decode", "cpu")
    assert decode["model"] == "/m" and decode["max_model_len"] == 2048
    assert decode["block_size"] == 32
    assert decode["kv_transfer_config"] == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_consumer",
        "kv_buffer_device": "cpu",
        "kv_connector_extra_config": {"kv_lease_duration": 30},
        "kv_load_failure_policy": "recompute",
    }
    prefill = cfg.engine_kwargs("prefill", "cuda")
    assert prefill["max_model_len"] == 1024
    assert prefill["kv_transfer_config"]["kv_connector_extra_config"] == {
        "kv_lease_duration": 30}
    assert prefill["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert "kv_load_failure_policy" not in prefill["kv_transfer_config"]
    assert "kv_transfer_config" not in cfg.engine_kwargs("aggregated", "cpu")


def test_kv_lease_reaches_vllm_connector_config():
    from vllm.config import KVTransferConfig

    cfg = AppConfig.model_validate({"model": {"path": "/m", "served_model_name": "m"},
                                    "nixl": {"kv_lease_s": 12}})
    for role in ("prefill", "decode"):
        kv = KVTransferConfig(**cfg.engine_kwargs(role, "cpu")["kv_transfer_config"])
        assert kv.get_from_extra_config("kv_lease_duration", 30) == 12
    with pytest.raises(ValidationError, match="kv_lease_s"):
        AppConfig.model_validate({"model": {"path": "/m", "served_model_name": "m"},
                                  "nixl": {"kv_lease_s": 3}})


def test_only_a_pull_decode_engine_gets_the_reader_progress_delay():
    """Decode under pull only initiates READs (it polls them itself); prefill answers READs
    and decode under push receives WRITEs and their notifications, so both keep the short
    delay."""
    base = {"model": {"path": "/m", "served_model_name": "m"},
            "nixl": {"progress_delay_us": 100, "reader_progress_delay_us": 7000}}
    pull = AppConfig.model_validate(base)
    assert pull.nixl_progress_delay_us("decode") == 7000
    assert pull.nixl_progress_delay_us("prefill") == 100
    assert pull.nixl_progress_delay_us("aggregated") == 100
    push = AppConfig.model_validate({**base, "handoff": {"transfer": "push"}})
    assert push.nixl_progress_delay_us("decode") == 100
    assert push.nixl_progress_delay_us("prefill") == 100


def test_only_a_pull_decode_engine_gets_the_short_kv_wait_sleep():
    """A pull decode engine's READ is noticed at an idle engine step; under push decode
    waits through the whole prefill (a short sleep would spin its core all that time), and
    prefill's idle steps (waiting for readers to free blocks) are off the request's path."""
    base = {"model": {"path": "/m", "served_model_name": "m"},
            "engine_process": {"kv_wait_sleep_s": 0.0002}}
    pull = AppConfig.model_validate(base)
    assert pull.kv_wait_sleep_s("decode") == 0.0002
    assert pull.kv_wait_sleep_s("prefill") is None
    assert pull.kv_wait_sleep_s("aggregated") is None
    push = AppConfig.model_validate({**base, "handoff": {"transfer": "push"}})
    assert push.kv_wait_sleep_s("decode") is None
    vllms = AppConfig.model_validate({**base, "engine_process": {"kv_wait_sleep_s": None}})
    assert vllms.kv_wait_sleep_s("decode") is None
    for bad in (0, 0.002):  # 0 would spin; above vLLM's 1 ms only delays the handoff
        with pytest.raises(ValidationError, match="kv_wait_sleep_s"):
            AppConfig.model_validate({**base, "engine_process": {"kv_wait_sleep_s": bad}})


def test_only_a_pull_decode_engine_posts_reads_before_the_forward_pass():
    base = {"model": {"path": "/m", "served_model_name": "m"}}
    pull = AppConfig.model_validate(base)
    assert pull.reads_before_forward("decode") is True
    assert pull.reads_before_forward("prefill") is False
    assert pull.reads_before_forward("aggregated") is False
    push = AppConfig.model_validate({**base, "handoff": {"transfer": "push"}})
    assert push.reads_before_forward("decode") is False
    gpu = AppConfig.model_validate(
        {**base, "engine_process": {"kv_reads_before_forward": False}})
    assert gpu.reads_before_forward("decode") is False


def test_only_a_push_decode_engine_polls_for_notifications():
    """Under push the decode engine learns its KV arrived from a NIXL notification; under
    pull it polls its own READs, and prefill's notifications are off the request's path."""
    base = {"model": {"path": "/m", "served_model_name": "m"},
            "handoff": {"transfer": "push"}}
    push = AppConfig.model_validate(base)
    assert push.push_notif_poll_s("decode") == 0.0005
    assert push.push_notif_poll_s("prefill") is None
    pull = AppConfig.model_validate({**base, "handoff": {"transfer": "pull"}})
    assert pull.push_notif_poll_s("decode") is None
    agg = AppConfig.model_validate({**base, "mode": "aggregated"})
    assert agg.push_notif_poll_s("aggregated") is None
    vllms = AppConfig.model_validate({**base, "engine_process": {"push_notif_poll_s": None}})
    assert vllms.push_notif_poll_s("decode") is None
    for bad in (0, 0.02):
        with pytest.raises(ValidationError, match="push_notif_poll_s"):
            AppConfig.model_validate({**base, "engine_process": {"push_notif_poll_s": bad}})


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="prefil"):
        AppConfig.model_validate({"model": {"path": "m", "served_model_name": "m"}, "prefil": {}})


def test_engine_args_may_not_override_model_or_connector():
    with pytest.raises(ValidationError, match="kv_transfer_config"):
        AppConfig.model_validate(
            {
                "model": {"path": "m", "served_model_name": "m"},
                "decode": {"engine_args": {"kv_transfer_config": {}}},
            }
        )


@pytest.mark.parametrize(
    ("spec", "cores"), [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,2,4-5", {0, 2, 4, 5})]
)
def test_core_specs(spec, cores):
    assert parse_core_spec(spec) == cores


@pytest.mark.parametrize("spec", ["", "3-1", "a"])
def test_bad_core_specs(spec):
    with pytest.raises(ValueError):
        parse_core_spec(spec)


def test_bad_core_spec_fails_config_validation():
    with pytest.raises(ValidationError):
        AppConfig.model_validate(
            {"model": {"path": "m", "served_model_name": "m"}, "decode": {"cpu_cores": ["2-1"]}}
        )


def test_zero_shm_busy_loop_is_rejected():
    """0 was measured to hang engine start-up; the config refuses it."""
    with pytest.raises(ValidationError, match="shm_busy_loop_s"):
        AppConfig.model_validate(
            {
                "model": {"path": "m", "served_model_name": "m"},
                "engine_process": {"shm_busy_loop_s": 0},
            }
        )


def test_local_autoscaling_config_wires_both_policies():
    """The YAML's app-level policy and the builder's per-deployment autoscaling_config."""
    from ray.serve.schema import ServeDeploySchema

    from app.builder import _engine_options

    raw = yaml.safe_load((CONFIGS / "local_autoscaling.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)  # what `serve run` parses
    assert schema.applications[0].autoscaling_policy["policy_function"] == (
        "autoscaling.policies:PDAppPolicy")
    cfg = AppConfig.model_validate(raw["applications"][0]["args"])
    assert cfg.autoscaling.enabled and cfg.autoscaling.budget == 4
    opts = _engine_options(cfg, "prefill")
    assert "num_replicas" not in opts
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 2)
    assert auto["policy"]["policy_kwargs"]["phase"] == "prefill"
    assert auto["policy"]["policy_kwargs"]["settings"]["ttft_slo_ms"] == 1000
    # Ray's own delays are neutral: the coordinator owns hysteresis and cooldowns.
    assert auto["upscale_delay_s"] == auto["downscale_delay_s"] == 0
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)  # Ray accepts it as is


def test_fixed_replicas_without_autoscaling():
    from app.builder import _engine_options

    cfg = AppConfig.model_validate(_app_args("local.yaml"))
    assert _engine_options(cfg, "decode")["num_replicas"] == 1


def test_only_a_push_prefill_engine_writes_blocks_early():
    """Early push acts on the engine that WRITEs: prefill under push, unless turned off."""
    base = {"model": {"path": "/m", "served_model_name": "m"},
            "handoff": {"transfer": "push"}}
    push = AppConfig.model_validate(base)
    assert push.push_early_blocks("prefill") is True
    assert push.push_early_blocks("decode") is False
    pull = AppConfig.model_validate({**base, "handoff": {"transfer": "pull"}})
    assert pull.push_early_blocks("prefill") is False
    off = AppConfig.model_validate(
        {**base, "handoff": {"transfer": "push", "push_early_blocks": False}})
    assert off.push_early_blocks("prefill") is False
    # completing early is part of early push: on with it, on the prefill side only
    assert push.push_complete_early("prefill") is True
    assert push.push_complete_early("decode") is False
    assert off.push_complete_early("prefill") is False
    assert pull.push_complete_early("prefill") is False
    blocks_only = AppConfig.model_validate(
        {**base, "handoff": {"transfer": "push", "push_complete_early": False}})
    assert blocks_only.push_early_blocks("prefill") is True
    assert blocks_only.push_complete_early("prefill") is False


def test_only_a_push_decode_engine_watches_the_source_of_its_kv():
    """The watch acts where KV is awaited from another engine's WRITE: decode under push."""
    base = {"model": {"path": "/m", "served_model_name": "m"},
            "handoff": {"transfer": "push"}}
    push = AppConfig.model_validate(base)
    assert push.push_source_probe_s("decode") == 1.0
    assert push.push_source_probe_s("prefill") is None
    pull = AppConfig.model_validate({**base, "handoff": {"transfer": "pull"}})
    assert pull.push_source_probe_s("decode") is None
    off = AppConfig.model_validate(
        {**base, "handoff": {"transfer": "push", "push_source_probe_s": None}})
    assert off.push_source_probe_s("decode") is None
    with pytest.raises(ValidationError, match="push_source_probe_s"):
        AppConfig.model_validate(
            {**base, "handoff": {"transfer": "push", "push_source_probe_s": 0}})


def test_both_engines_take_part_in_push_refusals_under_push_only():
    """Prefill refuses a too-late registration, decode reads the refusal: both or neither."""
    base = {"model": {"path": "/m", "served_model_name": "m"}}
    push = AppConfig.model_validate({**base, "handoff": {"transfer": "push"}})
    assert push.push_refusals("prefill") and push.push_refusals("decode")
    assert not push.push_refusals("aggregated")
    pull = AppConfig.model_validate(base)
    assert not pull.push_refusals("prefill") and not pull.push_refusals("decode")


def test_only_decode_engines_skip_the_idle_sleep_once_kv_is_in():
    base = {"model": {"path": "/m", "served_model_name": "m"}}
    for transfer in ("pull", "push"):
        cfg = AppConfig.model_validate({**base, "handoff": {"transfer": transfer}})
        assert cfg.kv_ready_at_once("decode") is True
        assert cfg.kv_ready_at_once("prefill") is False
    assert AppConfig.model_validate({**base, "mode": "aggregated"}).kv_ready_at_once(
        "aggregated") is False
    off = AppConfig.model_validate({**base, "engine_process": {"kv_ready_at_once": False}})
    assert off.kv_ready_at_once("decode") is False
