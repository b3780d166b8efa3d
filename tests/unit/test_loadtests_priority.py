"""The load generator's real-time priority (loadtests.priority): on while the block runs, off
after it, never passed on to a process started inside it (the server under test)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadtests.priority import client_priority


def _can_use_realtime() -> bool:
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    os.sched_setscheduler(0, *before)
    return True


def test_normal_changes_nothing() -> None:
    before = os.sched_getscheduler(0)
    with client_priority("normal"):
        assert os.sched_getscheduler(0) == before


@pytest.mark.skipif(not _can_use_realtime(), reason="needs root or CAP_SYS_NICE")
def test_realtime_inside_the_block_only_and_not_inherited_by_children() -> None:
    before = os.sched_getscheduler(0)
    with client_priority("realtime"):
        assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
            capture_output=True, text=True, check=True)
        assert int(child.stdout) == os.SCHED_OTHER  # the server it starts runs normally
    assert os.sched_getscheduler(0) == before


def test_realtime_without_permission_says_what_to_do() -> None:
    """Run as an unprivileged user (root drops to ``nobody`` in the child, after imports)."""
    code = (
        "import os\n"
        "from loadtests.priority import client_priority\n"
        "if os.geteuid() == 0:\n"
        "    os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    with client_priority('realtime'):\n"
        "        print('no error')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=root, check=True)
    assert "CAP_SYS_NICE" in child.stdout and "--client-priority realtime" in child.stdout
