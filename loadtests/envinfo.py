"""Where a benchmark ran (CPU model, cores, memory), stored with every result: numbers
without their hardware cannot be compared."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        pass
    return None


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def hardware() -> dict[str, Any]:
    """nproc (usable cores), CPU model, memory, OS and Python."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": _git_commit(Path(__file__).resolve().parents[1]),
    }


def hardware_line(info: dict[str, Any]) -> str:
    mem = info.get("mem_total_gib")
    return (
        f"{info.get('nproc')} cores usable (nproc) of {info.get('cpu_count')}, "
        f"{info.get('cpu_model')}, {mem if mem is not None else '?'} GiB RAM, "
        f"{info.get('platform')}"
    )
