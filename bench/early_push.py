"""Early push A/B: a chunked prefill's KV WRITTEN while it computes vs at its end (issue 11).

Small model, 2k-token prompts, ``handoff.transfer: push`` with prefill in 512-token chunks,
``handoff.push_early_blocks`` off and on in alternated app starts (this machine's state drifts
by tens of percent over minutes, so each round runs both). Reports prefill's token 1 → decode
scheduled (the handoff on the request's path) and the in-path bandwidth the issue sets its
target on: the request's KV bytes over that time, against a raw NIXL READ of the same size
between two processes on the engines' cores. With early push most bytes move *before* token
1, so the in-path figure says how much of the transfer is left on the path, not how fast the
copy is. Writes section ``bench:early_push`` of docs/BENCHMARKS.md.

    python bench/early_push.py [--rounds 3] [--requests 8]

Other settings can be compared the same way, on top of the chunked push app or the pull one:
``--a SECTION.KEY=JSON --b SECTION.KEY=JSON [--transfer pull] --no-docs`` (e.g. decode's
``engine_process.kv_ready_at_once``); the docs section is written for the default A/B only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from handoff import (  # noqa: E402
    PUSH_CHUNK_TOKENS,
    RAW_CHUNK_KIB,
    chunked_push_args,
    prompts,
    raw_nixl,
    run_point,
)

from app.config import READER_PROGRESS_DELAY_US  # noqa: E402
from loadtests.envinfo import hardware, hardware_line  # noqa: E402
from loadtests.mdsection import update_file  # noqa: E402

SECTION = "bench:early_push"
MODEL = "small-llama"
PROMPT_TOKENS = 2000
BLOCK_SIZE = 32  # bench/handoff.py's engines


def kv_bytes_per_request(model_dir: Path, tokens: int) -> int:
    """The prompt's KV as the engines hold it (bf16, whole blocks): what a push moves."""
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 2
    return -(-tokens // BLOCK_SIZE) * BLOCK_SIZE * per_token


def gbps_text(kv_bytes: int, in_path_ms: float) -> str:
    return f"{kv_bytes / (in_path_ms * 1e6):.2f} GB/s" if in_path_ms else \
        "unbounded (the median request had its KV before prefill's token 1)"


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="per point and round")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--nixl-delay-us", type=int, default=100)
    parser.add_argument("--reader-delay-us", type=int, default=READER_PROGRESS_DELAY_US)
    parser.add_argument("--policy", default="power_of_two")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    parser.add_argument("--a", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="setting(s) of point A (default: handoff.push_early_blocks=false)")
    parser.add_argument("--b", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="setting(s) of point B (default: handoff.push_early_blocks=true)")
    parser.add_argument("--transfer", choices=["push", "pull"], default="push",
                        help="pull: the A/B on the pull app (prefill unchunked, token 1 "
                        "from decode)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "early_push")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-docs", action="store_true")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw_argv)
    default_ab = not (args.a or args.b or args.transfer != "push")
    if default_ab:
        args.a, args.b = ["handoff.push_early_blocks=false"], ["handoff.push_early_blocks=true"]

    def point_args(early: bool):
        sets = args.b if early else args.a
        if args.transfer == "pull":
            return argparse.Namespace(**{**vars(args), "set": [*args.set, *sets]})
        base = chunked_push_args(args, True)
        return argparse.Namespace(**{**vars(base), "set": [*base.set, *sets]})

    command = shlex.join(["python", "bench/early_push.py", *raw_argv])
    args.out.mkdir(parents=True, exist_ok=True)

    model_dir = ROOT / "models" / MODEL
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    kv = kv_bytes_per_request(model_dir, PROMPT_TOKENS)
    spans: dict[bool, list[list[float]]] = {False: [], True: []}
    ttft: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for early in (False, True):
            batch = prompts(args.requests + 2, PROMPT_TOKENS, vocab, seed=100 + r)
            name = f"{args.transfer}-{'b' if early else 'a'}-{r}"
            point = run_point(point_args(early), name, MODEL, False, "auto",
                              args.out, [("2000", batch, 16)], None)[0]["2000"]
            spans[early].append([t["in_path_ms"] for t in point.timelines
                                 if t.get("in_path_ms") is not None])
            ttft[early] += [s.ttft * 1e3 for s in point.streams if s.ttft is not None]
    raw = raw_nixl(kv / (1 << 20), RAW_CHUNK_KIB, args.nixl_delay_us)

    def pooled(early: bool) -> list[float]:
        return [v for rnd in spans[early] for v in rnd]

    # the default A/B: vLLM's one WRITE at the finish (`end`) vs early push (`early`)
    la, lb = ("end", "early") if default_ab else ("A", "B")
    hw = hardware()
    lines = [
        "## KV handoff: early push, a chunked prefill's KV written while it computes "
        "(issue 11)", "",
        f"Generated by `bench/early_push.py` on {datetime.now():%Y-%m-%d %H:%M} "
        f"(commit `{hw.get('git_commit') or '?'}`).", "",
        f"- Command: `{command}`",
        f"- Hardware: {hardware_line(hw)}",
        f"- Small model, {PROMPT_TOKENS}-token prompts ({kv / 1e6:.2f} MB of bf16 KV each), "
        + (f"`handoff.transfer: push`, prefill in {PUSH_CHUNK_TOKENS}-token chunks "
           "(`prefill.engine_args.max_num_batched_tokens`)" if args.transfer == "push" else
           "`handoff.transfer: pull`, token 1 from decode")
        + ", prefill on core 0, decode on core "
        f"1; `{la}` = {' '.join(args.a)}, `{lb}` = {' '.join(args.b)}, in alternated app "
        "starts, "
        f"{args.requests} sequential requests each.",
        "- `in-path` = prefill's token 1 → decode schedules the request (the front's "
        "`pd_timeline`), ms, 0 when decode scheduled it first (its KV had arrived before "
        "prefill's engine put out token 1); bandwidth = KV bytes / that time.", "",
        f"| round | {la}: in-path p50 | {lb}: in-path p50 |", "|---|---|---|"]
    for r in range(args.rounds):
        e, a = p50(spans[False][r]), p50(spans[True][r])
        lines.append(f"| {r + 1} | {e:.2f} | {a:.2f} |" if e is not None and a is not None
                     else f"| {r + 1} | n/a | n/a |")
    end, early = p50(pooled(False)), p50(pooled(True))
    both = end is not None and early is not None
    lines += ["", f"| | {la} | {lb} |", "|---|---|---|",
              f"| in-path p50, all rounds (n = {len(pooled(False))} / {len(pooled(True))}) | "
              f"{end:.2f} ms | {early:.2f} ms |" if both else "| in-path | n/a | n/a |"]
    checks = []
    if both:
        lines.append(f"| requests decode scheduled before prefill's token 1 (in-path 0) | "
                     f"{sum(v == 0 for v in pooled(False))} | "
                     f"{sum(v == 0 for v in pooled(True))} |")
        lines.append(f"| in-path bandwidth | {gbps_text(kv, end)} | {gbps_text(kv, early)} |")
        lines.append(f"| TTFT p50 | {p50(ttft[False]):.0f} ms | {p50(ttft[True]):.0f} ms |")
    if raw is not None:
        lines += ["", f"Raw NIXL READ, two processes on cores 0-1, {raw['mib']:.2f} MiB in "
                  f"{raw['chunk_kib']} KiB descriptors: **{raw['gbps']:.2f} GB/s**."]
        if early is not None:
            gbps = kv / (early * 1e6) if early else float("inf")
            checks.append(("in-path KV bandwidth ≥ 0.7 × raw NIXL READ (small model, 2k "
                           f"prompts, {args.transfer}, {lb})",
                           f"{gbps:.2f} vs 0.7 × {raw['gbps']:.2f} = {0.7 * raw['gbps']:.2f} "
                           "GB/s", gbps >= 0.7 * raw["gbps"]))
    if both:
        checks.append((f"{lb} shortens the handoff on the path vs {la}",
                       f"{early:.2f} vs {end:.2f} ms", early < end))
    lines += ["", "Checks (within this run):", ""]
    lines += [f"- {'✅' if ok else '❌'} {name}: {detail}" for name, detail, ok in checks]
    text = "\n".join(lines)
    print(text)
    (args.out / "results.json").write_text(json.dumps(
        {"spans_ms": {"end": spans[False], "early": spans[True]}, "ttft_ms": {
            "end": ttft[False], "early": ttft[True]}, "kv_bytes": kv, "raw_nixl": raw},
        indent=1))
    if not args.no_docs and default_ab:
        update_file(args.docs, SECTION, text)
        print(f"wrote section {SECTION} of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
