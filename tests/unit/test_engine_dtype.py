"""The engines' dtype on CPUs (app/engine_dtype.py): float32 only on an x86 CPU without native
bf16, and never over a dtype the config names."""

from __future__ import annotations

from app.engine_dtype import cpu_engine_dtype, engine_dtype_args, vllm_cli_dtype_args


def test_float32_only_on_an_x86_cpu_without_native_bf16():
    assert cpu_engine_dtype({}, on_cpu=True, x86=True, native_bf16=False) == {"dtype": "float32"}
    assert cpu_engine_dtype({}, on_cpu=True, x86=True, native_bf16=True) == {}
    assert cpu_engine_dtype({}, on_cpu=False, x86=True, native_bf16=False) == {}  # a GPU
    assert cpu_engine_dtype({}, on_cpu=True, x86=False, native_bf16=False) == {}  # not measured


def test_a_dtype_the_config_names_wins():
    for dtype in ("bfloat16", "float32", "auto"):
        assert cpu_engine_dtype({"dtype": dtype}, on_cpu=True, x86=True,
                                native_bf16=False) == {}


def test_plain_vllm_servers_get_the_choice_the_app_makes_on_this_machine():
    choice = engine_dtype_args({})
    assert vllm_cli_dtype_args() == (["--dtype", "float32"] if choice else [])
    assert choice in ({}, {"dtype": "float32"})
