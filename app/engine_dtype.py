"""The engines' dtype on x86 CPUs without native bf16: float32.

vLLM-CPU runs a bf16 model (and an fp16 one, which it casts to bf16) in bf16. A CPU with
AVX512-BF16 or AMX computes that natively; one without (AVX2 only, or AVX-512 without the BF16
extension) converts every operand. Measured on an AVX2-only AMD EPYC (2 cores, tiny model,
200-token prompts, ``bench/serving_overhead.py --setups aggregated --concurrency 1``, 16
requests each, 2026-12-07): TTFT p50 **256 ms in bf16 vs 52 ms in float32** (TPOT 7.97 vs
7.86 ms); torch's own bf16 matmul was ~140x slower than float32 there, and the test suite
was on course to run past CI's limit on that machine in bf16. So on such CPUs the app runs
its engines in float32 unless ``engine_args`` (or the phase's) name a ``dtype``. The KV cache
is then float32 too: twice the bytes per token, in the cache and on the wire.

Prefill and decode must agree on the dtype (NIXL moves raw KV blocks): engines on CPUs of
different kinds should set ``dtype`` explicitly. GPUs are left alone.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_engine_dtype(engine_args: dict[str, Any], on_cpu: bool, x86: bool,
                     native_bf16: bool) -> dict[str, Any]:
    """Engine args to add: ``{"dtype": "float32"}`` for an engine on an x86 CPU without native
    bf16 whose args name no dtype; nothing otherwise (an explicit dtype always wins)."""
    if on_cpu and x86 and not native_bf16 and "dtype" not in engine_args:
        return {"dtype": "float32"}
    return {}


def engine_dtype_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """:func:`cpu_engine_dtype` for this process's platform and CPU (logged when it acts)."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    extra = cpu_engine_dtype(engine_args, on_cpu, x86, on_cpu and x86 and cpu_has_native_bf16())
    if extra:
        log.info("this CPU has no native bf16 (no AVX512-BF16, no AMX): the engine runs in "
                 "float32, several times faster here (set engine_args.dtype to override)")
    return extra


def vllm_cli_dtype_args() -> list[str]:
    """The same choice as ``vllm serve`` flags, for plain vLLM servers that benches and tests
    run beside the app (compared with it, so they must compute in the same dtype)."""
    extra = engine_dtype_args({})
    return ["--dtype", extra["dtype"]] if extra else []
