"""Is this machine stalling whole processes, and at which priority?

The CPU load tests saw every open stream and the load generator itself freeze for 0.4-1.8 s
at once (issue 8, fidelity). This runs beside any load: two tickers that only sleep 5 ms in
a loop, one at normal priority and one real-time (``SCHED_FIFO``, needs root; skipped
otherwise), each recording every gap over ``--gap-ms`` with its wall-clock time, plus the
machine's steal time and major page faults sampled once a second. A normal-priority ticker
that freezes means the host's scheduler starved an almost idle process; a real-time one that
freezes too means the whole VM stopped (the hypervisor), not anything running in it::

    python bench/stall_watch.py --seconds 900 --out results/stall_watch.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path


def _ticker(label: str, realtime: bool, seconds: float, gap_s: float, queue: mp.Queue) -> None:
    if realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as exc:  # PermissionError without root
            queue.put({"label": label, "error": f"no SCHED_FIFO: {exc}"})
            return
    gaps: list[tuple[float, float]] = []
    end = time.monotonic() + seconds
    last = time.monotonic()
    while last < end:
        time.sleep(0.005)
        now = time.monotonic()
        if now - last > gap_s:
            gaps.append((time.time() - (now - last), now - last))
        last = now
    queue.put({"label": label, "gaps": gaps})


def _machine_counters() -> dict[str, int]:
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    with open("/proc/vmstat") as f:
        vm = dict(line.split() for line in f)
    return {"steal_jiffies": int(cpu[8]), "pgmajfault": int(vm.get("pgmajfault", 0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--gap-ms", type=float, default=50)
    p.add_argument("--out", type=Path, default=Path("results/stall_watch.json"))
    args = p.parse_args()
    queue: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_ticker, args=(label, rt, args.seconds, args.gap_ms / 1e3, queue))
             for label, rt in (("normal", False), ("realtime", True))]
    for proc in procs:
        proc.start()
    samples = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        samples.append({"t": time.time(), **_machine_counters()})
        time.sleep(1.0)
    results = {r["label"]: r for r in (queue.get() for _ in procs)}
    for proc in procs:
        proc.join()
    hz = os.sysconf("SC_CLK_TCK")
    steal = [(b["t"], (b["steal_jiffies"] - a["steal_jiffies"]) / hz)
             for a, b in zip(samples, samples[1:], strict=False)]
    out = {"seconds": args.seconds, "gap_ms": args.gap_ms, "tickers": results,
           "steal_s_per_s": steal,
           "pgmajfault": samples[-1]["pgmajfault"] - samples[0]["pgmajfault"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out))
    for label, r in results.items():
        gaps = r.get("gaps", [])
        worst = max((g for _, g in gaps), default=0.0)
        print(f"{label}: {r.get('error') or f'{len(gaps)} gaps > {args.gap_ms:g} ms'}, "
              f"worst {worst * 1e3:.0f} ms")
    print(f"steal: worst {max((s for _, s in steal), default=0):.2f} s/s, "
          f"total {sum(s for _, s in steal):.1f} s; major faults {out['pgmajfault']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
