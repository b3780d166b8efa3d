"""Do running decode streams stall while another prompt is prefilled?

In the CPU load tests (small model, prefill engine on core 0, decode engine on core 1), many
streams of a disaggregated run froze together for 1-2.7 s and resumed at the instant new
requests got their first token. On separate cores nothing should stall decode. This probe
isolates it: ``--streams`` long greedy streams decode; after ``--settle-s`` one long prompt
(``--prompt-tokens``) is sent; every stream's token arrival times are kept (one thread per
stream, nothing else in the client) and the largest gap during the prompt's life is compared
with the streams' median gap.

    python bench/stall_probe.py                      # disaggregated, small model
    python bench/stall_probe.py --mode aggregated    # reference: a shared engine must stall
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.scenarios.pd_vs_aggregated import serve_config  # noqa: E402
from loadtests.servers import running_app  # noqa: E402


class Stream(threading.Thread):
    def __init__(self, base: str, model: str, prompt: list[int], max_tokens: int):
        super().__init__(daemon=True)
        self.base, self.model, self.prompt, self.max_tokens = base, model, prompt, max_tokens
        self.times: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "add_special_tokens": False}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body,
                              timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        obj = json.loads(line[6:])
                        if obj.get("choices"):
                            self.times.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - reported
            self.error = f"{type(exc).__name__}: {exc}"


def probe(base: str, model: str, streams: int, prompt_tokens: int, settle_s: float,
          rounds: int) -> list[dict]:
    out = []
    for k in range(rounds):
        bg = [Stream(base, model, [300 + 7 * i + k + j % 50 for j in range(64)], 400)
              for i in range(streams)]
        for s in bg:
            s.start()
        time.sleep(settle_s)
        big = [1000 + (j * 13 + k) % 3000 for j in range(prompt_tokens)]
        t0 = time.monotonic()
        head = Stream(base, model, big, 2)
        head.start()
        head.join(300)
        t1 = head.times[0] if head.times else time.monotonic()
        for s in bg:
            s.join(300)
        during, before = [], []
        for s in bg:
            gaps = list(zip(s.times, s.times[1:], strict=False))
            during += [b - a for a, b in gaps if b > t0 and a < t1]
            before += [b - a for a, b in gaps if b <= t0]
        row = {"round": k, "prompt_ttft_ms": round((t1 - t0) * 1e3, 1),
               "median_gap_before_ms": round(statistics.median(before) * 1e3, 1),
               "max_gap_during_ms": round(max(during) * 1e3, 1) if during else None,
               "median_gap_during_ms": round(statistics.median(during) * 1e3, 1)
               if during else None,
               "errors": [s.error for s in [*bg, head] if s.error]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="disaggregated")
    ap.add_argument("--model-path", default="models/small-llama")
    ap.add_argument("--served-model-name", default="small-llama")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1800)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/stall_probe"))
    args = ap.parse_args()
    cfg = serve_config(args.mode, args.model_path, args.served_model_name, "127.0.0.1",
                       args.port, 2048, local_prefill_max_tokens=0)
    with running_app(cfg, args.work_dir, args.mode, "127.0.0.1", args.port,
                     args.served_model_name) as (base, _, _):
        probe(base, args.served_model_name, args.streams, args.prompt_tokens, args.settle_s,
              args.rounds)


if __name__ == "__main__":
    main()
