"""GPU capacity profiles from NVIDIA aiconfigurator-core's published perf tables.

``aiconfigurator-core`` (Apache-2.0, PyPI) ships per-GPU tables collected on silicon with
each engine (GEMM, context and generation attention, communication: ``systems/data/<system>/
<op>/<backend>/<version>/*.parquet``) and composes them per model into step latencies. This
converter asks its compiled engine (``EngineHandle``) for:

- prefill: ``predict_prefill_latency(batch, isl)``: a step computing ``batch`` prompts of
  ``isl`` tokens, for lone prompts and batches, up to ``max_num_batched_tokens``;
- decode: ``predict_decode_latency(batch, context, osl=2)``: one generation step of
  ``batch`` sequences at ``context`` tokens (the ITL), on a batch x context grid that fits the
  KV capacity;
- KV: ``estimate_kv_cache`` (its vLLM memory model: GPU memory x gpu_memory_utilization minus
  weights, activations and runtime overhead) for bytes per token and capacity.

What the tables do not hold is stated in the profile, never filled silently:

- KV transfer (NIXL) time: aiconfigurator has no KV-transfer data. The points are the link
  rate of its system spec (``node.inter_node_bw`` or ``intra_node_bw``, plus ``p2p_latency``),
  i.e. a lower bound for the hand-off, named in ``notes``;
- ``max_num_batched_tokens``/``max_num_seqs``: vLLM's own defaults for its OpenAI server on that
  GPU (``EngineArgs.get_batch_defaults``, vLLM 0.32);
- ``startup_s``: a published measurement of vLLM start-up (``--startup-s``/``--startup-basis``).
"""

from __future__ import annotations

import argparse
import logging
import math
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

from autoscaling.profile_model import (
    DecodePoint,
    KVProfile,
    PrefillPoint,
    Profile,
    TransferPoint,
)

GIB = 1024**3
PREFILL_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PREFILL_BATCHES = (4, 16)  # batched steps beside the lone prompt, same token counts
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DECODE_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)
TRANSFER_TOKENS = (128, 512, 2048, 8192, 32768)

# Published start-up measurement used when --startup-s is not given.
DEFAULT_STARTUP_S = 82.0
DEFAULT_STARTUP_BASIS = (
    "startup_s 82 s: vLLM cold start of meta-llama/Llama-3.1-8B-Instruct on an L40S with the "
    "weights already on local disk and the torch.compile cache warm (weight loading 18 s + "
    "Dynamo 10 s + graph compilation 13 s + CUDA graph capture 7 s + engine init and imports "
    "34 s), published by Tensorfuse, 'Reducing GPU Cold Start Time when using vLLM' "
    "(2025-09-01, https://tensorfuse.io/docs/blogs/reducing_gpu_cold_start); the same post "
    "measures 294 s with nothing cached (61 s download). Applied to every GPU as an "
    "assumption (those steps are mostly CPU-bound); excludes node/container provisioning.")

HARDWARE = {
    "h100_sxm": "NVIDIA H100 SXM 80GB",
    "h200_sxm": "NVIDIA H200 SXM 141GB",
    "a100_sxm": "NVIDIA A100 SXM 80GB",
    "l40s": "NVIDIA L40S 48GB",
    "b200_sxm": "NVIDIA B200 SXM 180GB",
}


def vllm_batch_defaults(system: str, mem_capacity_bytes: int) -> tuple[int, int]:
    """vLLM 0.32's ``EngineArgs.get_batch_defaults`` for its OpenAI server on one GPU:
    (max_num_batched_tokens, max_num_seqs)."""
    if mem_capacity_bytes >= 160 * GIB:
        return 16384, 1024
    if mem_capacity_bytes >= 70 * GIB and "a100" not in system.lower():
        return 8192, 1024
    return 2048, 256


def _package_version() -> str:
    try:
        return metadata.version("aiconfigurator-core")
    except metadata.PackageNotFoundError:
        return "?"


def _system_spec(system: str) -> dict[str, Any]:
    import aiconfigurator_core
    import yaml

    path = Path(aiconfigurator_core.__file__).parent / "systems" / f"{system}.yaml"
    return yaml.safe_load(path.read_text())


def _literal_version(system: str, backend: str, backend_version: str | None) -> str:
    from aiconfigurator_core.sdk import perf_database

    requested = backend_version or "current"
    return str(perf_database.resolve_query_version(system, backend, requested))


def convert(system: str, model: str, backend: str = "vllm", backend_version: str | None = None,
            *, tp_size: int = 1, gpu_memory_utilization: float = 0.92,
            max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
            kv_link: str = "inter_node", startup_s: float = DEFAULT_STARTUP_S,
            startup_basis: str = DEFAULT_STARTUP_BASIS, name: str | None = None,
            command: str = "") -> Profile:
    """Build a :class:`Profile` from aiconfigurator-core's tables for one engine."""
    from aiconfigurator_core.sdk.engine import EngineHandle
    from aiconfigurator_core.sdk.memory import estimate_kv_cache

    # Its loader logs each low-fidelity fallback table it indexes (other models' ops).
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    version = _literal_version(system, backend, backend_version)
    spec = _system_spec(system)
    mem = int(spec["gpu"]["mem_capacity"])
    d_tokens, d_seqs = vllm_batch_defaults(system, mem)
    mnbt = max_num_batched_tokens or d_tokens
    mns = max_num_seqs or d_seqs

    handle = EngineHandle.compile(model, system, backend, backend_version=version,
                                  tp_size=tp_size)
    kv = estimate_kv_cache(model, system, backend, version, max_num_tokens=mnbt,
                           max_batch_size=mns, memory_fraction_kind="of_total",
                           memory_fraction_value=gpu_memory_utilization, tp_size=tp_size)
    bytes_per_token = int(kv["kv_size_per_token_bytes"])
    capacity = int(kv["total_kv_size_tokens"])

    prefill: list[PrefillPoint] = []
    for tokens in PREFILL_TOKENS:
        if tokens > mnbt:
            break
        for batch in (1, *PREFILL_BATCHES):
            if tokens % batch or tokens // batch < 64:
                continue
            ms = float(handle.predict_prefill_latency(batch, tokens // batch))
            prefill.append(PrefillPoint(tokens=tokens, batch=batch, ms=round(ms, 4)))
    decode: list[DecodePoint] = []
    for batch in DECODE_BATCHES:
        if batch > mns:
            break
        for context in DECODE_CONTEXTS:
            if batch * context > capacity:
                continue
            ms = float(handle.predict_decode_latency(batch, context, 2))
            decode.append(DecodePoint(batch=batch, context=context, itl_ms=round(ms, 4)))

    node = spec["node"]
    link_bw = float(node[f"{kv_link}_bw"])
    pcie_bw = float(node.get("pcie_bw") or link_bw)
    if kv_link == "inter_node" and pcie_bw < link_bw:
        link_bw = pcie_bw  # GPU memory reaches the NIC over PCIe (GPUDirect RDMA)
    latency_ms = float(node.get("p2p_latency", 0.0)) * 1e3
    transfer = [TransferPoint(bytes=t * bytes_per_token,
                              ms=round(latency_ms + t * bytes_per_token / link_bw * 1e3, 4))
                for t in TRANSFER_TOKENS if t <= capacity]

    pkg = _package_version()
    breakdown = kv.get("memory_breakdown") or {}
    model_short = model.split("/")[-1]
    notes = [
        f"Converted by `{command}` on {date.today().isoformat()}." if command else
        f"Converted on {date.today().isoformat()}.",
        f"prefill: aiconfigurator EngineHandle.predict_prefill_latency(batch, isl) for a lone "
        f"prompt (batch 1) and batches of {', '.join(map(str, PREFILL_BATCHES))} prompts of "
        f"tokens/batch each, tokens up to max_num_batched_tokens ({mnbt}); e.g. "
        f"{_tok_s(handle, 1024):.0f} tok/s at a 1024-token prompt.",
        f"decode: predict_decode_latency(batch, context, osl=2) = one generation step (the "
        f"ITL) of `batch` sequences at `context` tokens; grid batch {DECODE_BATCHES[0]}.."
        f"{max(p.batch for p in decode)} x context {DECODE_CONTEXTS[0]}..{DECODE_CONTEXTS[-1]},"
        f" only cells with batch x context <= capacity_tokens.",
        f"kv: estimate_kv_cache (aiconfigurator's vLLM memory model, native): GPU memory "
        f"{mem / GIB:.1f} GiB x gpu_memory_utilization {gpu_memory_utilization} (vLLM 0.32 "
        f"default 0.92) minus weights {breakdown.get('weights_bytes', 0) / GIB:.2f} GiB, "
        f"activations {breakdown.get('activations_bytes', 0) / GIB:.2f} GiB and runtime "
        f"overhead {breakdown.get('runtime_overhead_bytes', 0) / GIB:.2f} GiB = "
        f"{kv['total_kv_size_bytes'] / GIB:.2f} GiB of KV; bytes_per_token = layers x KV "
        f"heads x head dim x 2 x dtype bytes from the model config ({bytes_per_token}).",
        f"kv.transfer: NOT from measured KV transfers (aiconfigurator-core has no KV-transfer "
        f"data). Assumed: the KV moves at the {kv_link.replace('_', '-')} link rate of "
        f"aiconfigurator's {system} system spec ({_link_text(system, kv_link)}; inter-node "
        f"traffic capped by its pcie_bw {pcie_bw / 1e9:g} GB/s, the GPU-to-NIC path), "
        f"{link_bw / 1e9:g} GB/s per GPU one way, plus its p2p_latency {latency_ms:g} ms. A lower "
        f"bound: NIXL's handshake/notification and the serving path's hand-off (tens of ms on "
        f"CPU, DESIGN.md) are not included.",
        f"max_num_batched_tokens {mnbt} / max_num_seqs {mns}: vLLM 0.32's defaults for its "
        f"OpenAI server on this GPU (EngineArgs.get_batch_defaults: >= 160 GiB 16384/1024; "
        f">= 70 GiB and not A100 8192/1024; else 2048/256), not tabulated by aiconfigurator.",
        startup_basis,
        f"Tensor parallel {tp_size}, no speculative decoding, aiconfigurator default quant for "
        f"the checkpoint (bf16 weights and KV for {model_short}).",
    ]
    return Profile(
        name=name or f"{system.split('_')[0]}-{model_short.lower().removeprefix('meta-')}",
        model=model,
        hardware=f"{HARDWARE.get(system, system)} (aiconfigurator system {system}), TP{tp_size}",
        engine=f"{backend} {version} (the version aiconfigurator's tables were collected with)",
        source=(f"aiconfigurator-core {pkg} (NVIDIA, Apache-2.0, PyPI) perf database: system "
                f"{system}, backend {backend} {version} (systems/data/{system}/*/{backend}/"
                f"{version}); KV transfer and startup are assumptions with their sources in "
                f"notes"),
        max_num_batched_tokens=mnbt,
        max_num_seqs=mns,
        startup_s=startup_s,
        prefill=prefill,
        decode=decode,
        kv=KVProfile(bytes_per_token=bytes_per_token, capacity_tokens=capacity,
                     transfer=transfer),
        notes=notes,
    )


def _tok_s(handle, tokens: int) -> float:
    return tokens / float(handle.predict_prefill_latency(1, tokens)) * 1e3


def _link_text(system: str, kv_link: str) -> str:
    spec = _system_spec(system)
    path = Path(__import__("aiconfigurator_core").__file__).parent / "systems" / f"{system}.yaml"
    for line in path.read_text().splitlines():
        if line.strip().startswith(f"{kv_link}_bw:") and "#" in line:
            return "spec comment: " + line.split("#", 1)[1].strip()
    return f"{spec['node'][f'{kv_link}_bw']} B/s"


def fit_error(profile: Profile) -> float:
    """Largest relative error of the profile's ITL fit over its own decode points."""
    return max(abs(profile.itl_ms(p.batch, p.context) - p.itl_ms) / p.itl_ms
               for p in profile.decode)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", required=True,
                   help="aiconfigurator system: h100_sxm, h200_sxm, a100_sxm, l40s, b200_sxm")
    p.add_argument("--model", default="meta-llama/Meta-Llama-3.1-8B",
                   help="model as aiconfigurator knows it (HF id)")
    p.add_argument("--backend", default="vllm", choices=["vllm", "sglang", "trtllm"])
    p.add_argument("--backend-version", default=None,
                   help="a table version; default: the system's 'current' slot")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: vLLM's default for the GPU")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--kv-link", choices=["inter_node", "intra_node"], default="inter_node",
                   help="the link KV hand-offs are assumed to cross (prefill and decode "
                   "replicas on different nodes, or on one NVLink node)")
    p.add_argument("--startup-s", type=float, default=DEFAULT_STARTUP_S)
    p.add_argument("--startup-basis", default=DEFAULT_STARTUP_BASIS,
                   help="where --startup-s comes from (goes into notes)")
    p.add_argument("--name", default=None)
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace, command: list[str]) -> Profile:
    import shlex

    profile = convert(args.system, args.model, args.backend, args.backend_version,
                      tp_size=args.tp, gpu_memory_utilization=args.gpu_memory_utilization,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_num_seqs=args.max_num_seqs, kv_link=args.kv_link,
                      startup_s=args.startup_s, startup_basis=args.startup_basis,
                      name=args.name or Path(args.out).stem, command=shlex.join(command))
    err = fit_error(profile)
    notes = [*profile.notes, f"The policies' ITL fit (a + b*batch + c*batch*context) is within "
             f"{math.ceil(err * 100)}% of every decode point above."]
    return profile.model_copy(update={"notes": notes})
