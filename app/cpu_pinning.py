"""Pin every thread of an engine's processes to its cores.

``VLLM_CPU_OMP_THREADS_BIND`` alone is not enough: DESIGN.md found a worker's main compute
thread running on the other engine's core. Setting each thread's affinity after start-up (new
threads inherit it) makes the placement real; ``describe_affinity`` lets tests check it.
"""

from __future__ import annotations

import os

import psutil


def engine_pids(root_pid: int | None = None) -> list[int]:
    """The engine's processes: every descendant of the replica (engine core, workers)."""
    root = psutil.Process(root_pid or os.getpid())
    return [p.pid for p in root.children(recursive=True)]


def pin_process_tree(cores: set[int], pids: list[int]) -> int:
    """Set the affinity of every thread of ``pids``; returns how many threads were pinned."""
    pinned = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
                pinned += 1
            except (ProcessLookupError, PermissionError):
                continue
    return pinned


def describe_affinity(pids: list[int]) -> dict[int, list[int]]:
    """Union of cores each process's threads may run on, for checks and logs."""
    out: dict[int, list[int]] = {}
    for pid in pids:
        cores: set[int] = set()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                cores |= os.sched_getaffinity(int(tid))
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = sorted(cores)
    return out
