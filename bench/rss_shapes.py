"""Does the prefill engine's memory grow with the number of distinct batch shapes it has
seen, and stop once it has seen them all?

The 30-minute soak (`bench/reliability.py`) found the prefill ``VLLM::Worker`` growing by
~87 MB/h while the decode worker stayed flat. Decode steps have few shapes (one token per
running sequence); prefill steps have a new token count almost every time, and CPU kernels
keep per-shape state (oneDNN's primitive cache, 1,024 entries by default; allocator pools
sized by shape). This probe tells that apart from a leak: the P/D app (tiny model, as the
soak runs it) gets one prompt at a time, so every prefill step has exactly the prompt's
length, in ``--passes`` passes over the lengths 1..``--max-len`` (fresh random tokens each
time, so no prefix-cache hit makes a step shorter). Every engine process's RSS is read after
each ``--every`` prompts. A per-shape cache grows in the first pass and stays flat in the
later ones, which repeat the same shapes; a leak per request grows in every pass::

    python bench/rss_shapes.py                     # 3 passes over 1..1024 tokens
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reliability import MODEL, SERVED, app_processes, rss_mb, shape_sweep  # noqa: E402
from loadtests.scenarios.pd_vs_aggregated import serve_config  # noqa: E402
from loadtests.servers import running_app  # noqa: E402


def engine_rss(session: int) -> dict[str, float]:
    """RSS in MB of every vLLM engine process of the app, by name."""
    out = {}
    for pid, name in app_processes(session).items():
        if name.startswith("VLLM"):
            mb = rss_mb(pid)
            if mb is not None:
                out[name] = mb
    return out


def sweep(base: str, session: int, passes: int, max_len: int, every: int) -> list[dict]:
    rng = random.Random(7)
    rows: list[dict] = []
    for p in range(passes):
        t0 = time.monotonic()

        def sample(i: int, p: int = p, t0: float = t0) -> None:
            if i % every == 0 or i == max_len:
                rows.append({"pass": p + 1, "prompts": i, "s": time.monotonic() - t0,
                             "rss_mb": engine_rss(session)})

        shape_sweep(base, max_len, rng, sample)
        print(f"pass {p + 1}: " + ", ".join(
            f"{k} {v:.0f} MB" for k, v in sorted(rows[-1]["rss_mb"].items())), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--every", type=int, default=128)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--work-dir", default="results/rss_shapes")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="env var for every replica, e.g. ONEDNN_PRIMITIVE_CACHE_CAPACITY=0")
    args = p.parse_args(argv)
    cfg = serve_config("disaggregated", MODEL, SERVED, "127.0.0.1", args.port, 2048)
    if args.env:
        env = dict(kv.split("=", 1) for kv in args.env)
        cfg["applications"][0].setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    with running_app(cfg, Path(args.work_dir), "rss_shapes", "127.0.0.1", args.port,
                     SERVED) as (base, proc, _log):
        start = engine_rss(proc.pid)
        rows = sweep(base, proc.pid, args.passes, args.max_len, args.every)
    out = Path(args.work_dir) / "rss_shapes.json"
    out.write_text(json.dumps({"args": vars(args), "start": start, "rows": rows}))
    ends = {p: next(r for r in reversed(rows) if r["pass"] == p)["rss_mb"]
            for p in range(1, args.passes + 1)}
    print("| engine process | start MB | " + " | ".join(f"after pass {p}" for p in ends) + " |")
    print("|---|---|" + "---|" * len(ends))
    for name in sorted(start):
        print(f"| {name} | {start[name]:.0f} | "
              + " | ".join(f"{ends[p].get(name, float('nan')):.0f}" for p in ends) + " |")
    print(f"samples in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
