"""Write capacity profiles (``autoscaling/profiles/*.json``; schema: ``profile_model``).

Two sources, two sub-commands::

    # GPU: convert NVIDIA aiconfigurator-core's silicon-measured perf tables (no GPU needed)
    python -m autoscaling.profile aiconfigurator --system h100_sxm \\
        --model meta-llama/Meta-Llama-3.1-8B --backend vllm \\
        --out autoscaling/profiles/h100-llama-3.1-8b.json

    # CPU: measure a running engine of this app (takes the machine's two cores, ~5 minutes)
    python -m autoscaling.profile measure --model-path models/small-llama \\
        --out autoscaling/profiles/cpu-small-llama.json

The conversion lives in :mod:`autoscaling.profile_aiconfigurator`, the measurement in
:mod:`autoscaling.profile_measure`; this module holds what both share and the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
               "fp8": 1, "float8_e4m3fn": 1, "int8": 1}


def kv_bytes_per_token(hf_config: dict[str, Any], dtype_bytes: int | None = None) -> int:
    """KV bytes one token takes over all layers: layers x KV heads x head dim x 2 (K and V)
    x bytes per element (the checkpoint's dtype unless ``dtype_bytes`` says otherwise)."""
    cfg = hf_config.get("text_config") or hf_config
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if dtype_bytes is None:
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower()
        dtype_bytes = DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def load_hf_config(model_path: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_path) / "config.json").read_text())


def summary(profile) -> dict[str, Any]:
    """The figures a reader checks first (also printed by the CLI)."""
    p = profile
    fixed, per_byte = p._transfer_fit
    return {
        "name": p.name,
        "prefill_tokens_per_s": round(p.prefill_tokens_per_s, 1),
        "prefill_ms_at_max_num_batched_tokens": round(p.prefill_ms(p.max_num_batched_tokens), 2),
        "itl_ms_batch1_ctx1024": round(p.itl_ms(1, 1024), 3),
        "itl_ms_batch16_ctx1024": round(p.itl_ms(16, 1024), 3),
        "transfer_fixed_ms": round(fixed, 3),
        "transfer_GB_per_s": round(1e-6 / per_byte, 2) if per_byte > 0 else None,
        "transfer_ms_1k_tokens": round(p.transfer_ms(1024), 3),
        "capacity_tokens": p.kv.capacity_tokens,
        "bytes_per_token": p.kv.bytes_per_token,
        "startup_s": p.startup_s,
        "max_num_batched_tokens": p.max_num_batched_tokens,
        "max_num_seqs": p.max_num_seqs,
    }


# --- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoscaling.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from autoscaling import profile_aiconfigurator, profile_measure

    profile_aiconfigurator.add_arguments(sub.add_parser(
        "aiconfigurator", help="convert aiconfigurator-core's GPU perf tables into a profile",
        description=profile_aiconfigurator.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    profile_measure.add_arguments(sub.add_parser(
        "measure", help="measure this app's engine on CPU and write its profile",
        description=profile_measure.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    show = sub.add_parser("show", help="print a profile's key figures")
    show.add_argument("profile", help="path or committed profile name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    if args.command == "show":
        from autoscaling.profile_model import Profile

        print(json.dumps(summary(Profile.load(args.profile)), indent=1))
        return 0
    if args.command == "aiconfigurator":
        from autoscaling import profile_aiconfigurator as mod
    else:
        from autoscaling import profile_measure as mod
    profile = mod.run(args, ["python", "-m", "autoscaling.profile", *raw])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.dump(out)
    print(f"wrote {out}")
    print(json.dumps(summary(profile), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
