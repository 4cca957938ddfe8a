"""Stopping the process trees medfed's daemons start, by PID.

Flower's daemons start helpers of their own (the SuperLink its SuperExec, which starts one ServerApp process per
run; a hospital's SuperExec one ClientApp process per message). When a medfed daemon stops, every one of those
must stop with it: a ServerApp left behind would keep writing a run directory that a restarted coordinator resumes.
The tree is read from ``/proc/PID/task/*/children`` (Linux), and each process is signalled by its own PID.
:func:`port_taken` tells a daemon, before it starts, that another process already listens where it would;
:func:`split_address` is the one reader of the ``host:port`` addresses daemons listen at and connect to.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path

__all__ = ["descendants", "pid_alive", "port_taken", "split_address", "stop_tree"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except (OSError, ValueError):  # the task ended while being read
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first, then theirs), as it is now."""
    out: list[int] = []
    queue = _children(pid)
    while queue:
        child = queue.pop(0)
        if child not in out:
            out.append(child)
            queue += _children(child)
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has ended; only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(pid: int, *, timeout: float = 15.0) -> None:
    """SIGTERM ``pid`` and everything below it, then SIGKILL whatever still runs after ``timeout`` seconds.

    The tree is read before the first signal (a child re-parented to init once its parent has died could no longer
    be found), and read again before the SIGKILL for anything started meanwhile.
    """
    tree = [pid, *descendants(pid)]
    for target in tree:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    for target in [*tree, *(d for p in tree if pid_alive(p) for d in descendants(p))]:
        if pid_alive(target):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass


def split_address(address: str, *, host_required: bool = True) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port), the brackets removed; ValueError naming the problem
    otherwise. With ``host_required=False`` the host may be left out (``:9093``, every interface), read as ''."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or (host_required and not host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port with a port from 1 to 65535 (e.g. "
                         "coordinator.example.org:9092)")
    return host, int(port)


def port_taken(address: str) -> bool:
    """Whether another process already listens at ``address`` (host:port, [v6]:port; no host: every interface),
    tried as the SuperLink and SuperNode bind: with ``SO_REUSEADDR``, so a port whose last connections are closing
    counts free."""
    host, port = split_address(address, host_required=False)
    host = host or "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False
