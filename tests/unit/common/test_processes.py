"""Stopping a daemon's whole process tree by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from medfed.common.processes import descendants, stop_tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# a parent that starts a grandchild and ignores SIGTERM (as a stuck helper would); the grandchild sleeps
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waits for its parent's wait() but has ended
        return stat.read().split(") ", 1)[1][0] == "Z"


def test_stop_tree_stops_grandchildren_and_kills_what_ignores_sigterm():
    # Prepare
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        assert grandchild in descendants(parent.pid)

        # Execute
        stop_tree(parent.pid, timeout=1.0)
        parent.wait(timeout=10)

        # Assert
        assert parent.returncode == -9  # ignored SIGTERM, so it got SIGKILL after the timeout
        deadline = time.monotonic() + 5
        while not _gone(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(grandchild)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
