"""The load generator's CPU priority, for runs on the same machine as the server.

On a 2-core box with both cores busy in engines, the kernel starved an almost idle
normal-priority process for up to 1.3 s while a real-time one beside it never waited over
50 ms (`bench/stall_watch.py`, docs/BENCHMARKS.md). A starved client sends late and reads
every open stream late, so its TTFT and TPOT tails measure itself. ``realtime`` puts the
thread that runs the client's event loop on ``SCHED_FIFO`` (priority 1, the lowest) with
``SCHED_RESET_ON_FORK``, so a server started from it later runs at normal priority. It only
ever waits on sockets and timers, so it preempts the engines for the moments it has work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

ClientPriority = Literal["normal", "realtime"]
PRIORITIES = get_args(ClientPriority)  # the CLIs' choices


@contextmanager
def client_priority(priority: ClientPriority) -> Iterator[None]:
    """Run the block with the calling thread at ``priority``; restore it afterwards."""
    if priority == "normal":
        yield
        return
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except OSError as exc:
        raise RuntimeError(
            f"cannot give the load generator real-time priority ({exc}): it needs root or "
            "CAP_SYS_NICE (or an RLIMIT_RTPRIO of at least 1); run without "
            "--client-priority realtime"
        ) from exc
    try:
        yield
    finally:
        os.sched_setscheduler(0, before[0], before[1])
