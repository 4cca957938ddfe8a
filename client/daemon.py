"""The hospital daemon: a Flower SuperNode for the site, with medfed's gate in front of every ClientApp.

``medfed hospital start --config site.yaml`` runs two child processes and watches them:

- ``flower-supernode`` in ``process`` isolation: TLS to the coordinator (verified with the coordinator's CA
  certificate), SuperNode authentication with the site's key, the site's node config (site config path, privacy
  cap, state directory), unlimited reconnection attempts (network blips and coordinator restarts), runtime
  dependency installation off (Flower's default for SuperNodes, never switched on here);
- Flower's SuperExec loop, launching ``medfed-clientapp`` (:mod:`client.gate`) instead of ``flwr-clientapp`` for
  each message, so every bundle is checked against the site's approved list and every reply is audited.

Both children, and any ClientApp process still running, are stopped by PID when the daemon stops (SIGTERM /
SIGINT) or when the SuperExec exits.

Edits of site.yaml count from the hospital's next message on (each ClientApp reads the file again: its cap,
policy, threads, approved bundles, data); the daemon notices an edit and logs which of its keys need a restart
instead (the coordinator's address, the CA certificate, the node key, the runtime port: the SuperNode's command
line). When the SuperNode exits (it could not reach the coordinator, or the
coordinator refused to activate it: a key not registered yet, or a node still listed online right after a
restart), the daemon says what that means in one line (:func:`client.site_checks.explain_supernode_exit`) and
starts it again after a back-off (2 s, doubling up to a minute), so registering the key later, or a coordinator
that comes back, needs no restart at the hospital. Only a SuperNode exit that retrying cannot fix (a key that is not
an elliptic-curve key, node authentication without TLS) stops the daemon.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from medfed.common.environment import flower_environment, script
from medfed.common.errors import ConfigError
from medfed.common.processes import stop_tree

if TYPE_CHECKING:  # the site module imports torch: the SuperExec process (`python -m medfed.client.daemon
    from medfed.client.site import SiteConfig  # superexec`) never needs it (measured: 1.8 s and ~200 MiB each)

__all__ = ["HospitalDaemon", "child_environment", "node_config_arg", "supernode_command"]

logger = logging.getLogger(__name__)

PID_FILE = "daemon.pid"


def node_config_arg(values: dict[str, str | float | bool]) -> str:
    """Flower's ``--node-config`` string: space-separated ``key=value`` pairs with TOML values."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            parts.append(f"{key}={json.dumps(value)}")
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={'inf' if value == float('inf') else repr(float(value))}")
    return " ".join(parts)


def child_environment(site: SiteConfig) -> dict[str, str]:
    """The environment of the hospital's SuperNode, SuperExec and ClientApps: Flower's home (where the SuperNode
    installs each run's app bundle and the ClientApps load it from) is the site's own, ``STATE_DIR/flwr-home``, so
    two hospitals on one machine never install into the same folder at once (measured: a ClientApp then found a
    half-written bundle and failed to load)."""
    return {**os.environ, "FLWR_HOME": str(site.state_path / "flwr-home")}


def supernode_command(site: SiteConfig, *, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line of a hospital."""
    from medfed.client.site import node_config_for

    command = [script("flower-supernode"), "--superlink", site.superlink, "--isolation", "process",
               "--host", "127.0.0.1", "--port", str(site.runtime_port),
               "--node-config", node_config_arg(node_config_for(site))]
    if insecure:
        command.append("--insecure")
    else:
        ca = site.path(site.ca_certificate)
        if not ca.is_file():
            raise ConfigError(
                f"ca_certificate {ca} does not exist; copy the coordinator's ca.crt there (it lets this hospital "
                "verify the coordinator)."
            )
        command += ["--root-certificates", str(ca)]
    key = site.path(site.auth_key)
    if not key.is_file():
        raise ConfigError(f"auth_key {key} does not exist; create it with `medfed hospital init`.")
    command += ["--auth-supernode-private-key", str(key)]
    return command


RESTART_KEYS = ("superlink", "ca_certificate", "auth_key", "runtime_port")  # site.yaml keys read at start only
BACKOFF_S = (2.0, 60.0)  # the first wait before starting the SuperNode again, and the longest
STABLE_S = 120.0  # a SuperNode that ran this long before exiting starts again after the first wait


class _Tail:
    """Copies a child's output to this process's stdout, line by line, and keeps its last lines."""

    def __init__(self, stream: object, lines: int = 40) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self._thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self._thread.start()

    def _copy(self, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            self.lines.append(raw.decode("utf-8", errors="replace"))

    def text(self, wait: float = 2.0) -> str:
        self._thread.join(timeout=wait)  # the child has exited: its last lines are on their way
        return "".join(self.lines)


class HospitalDaemon:
    """Starts and watches a hospital's SuperNode and SuperExec; restarts the SuperNode after a back-off when it
    exits; stops both by PID."""

    def __init__(self, site: SiteConfig, *, insecure: bool = False, console: Sequence[str] | None = None) -> None:
        self.site = site
        self.insecure = insecure
        self.console_command = list(console) if console else None  # the hospital console, a process of its own
        self.console: subprocess.Popen[bytes] | None = None
        self.supernode: subprocess.Popen[bytes] | None = None
        self.superexec: subprocess.Popen[bytes] | None = None
        self._tail: _Tail | None = None
        self._started_at = 0.0
        self._stopping = False
        self._config_mtime = self._mtime()

    def _mtime(self) -> float:
        try:
            return self.site.source.stat().st_mtime if self.site.source is not None else 0.0
        except OSError:
            return 0.0

    def check_config(self) -> None:
        """Log what an edit of site.yaml changes: most keys count from the next message on; a few need a
        restart of the daemon. An invalid edit is reported (the next messages are refused until it is fixed)."""
        from medfed.client.site import load_site_config

        mtime = self._mtime()
        if mtime == self._config_mtime or self.site.source is None:
            return
        self._config_mtime = mtime
        try:
            new = load_site_config(self.site.source)
        except ConfigError as exc:
            logger.error("hospital %s: site.yaml was edited and is now invalid: %s Messages are refused until it "
                         "is fixed.", self.site.site_id, exc)
            return
        changed = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.site, k)]
        if changed:
            logger.warning("hospital %s: site.yaml changed %s, which the running daemon cannot take up: restart it "
                           "(stop it, then `medfed hospital start --config %s`). Its other settings count from the "
                           "next message on.", self.site.site_id, ", ".join(changed), self.site.source)
        else:
            logger.info("hospital %s: site.yaml changed; the new settings count from the next message on.",
                        self.site.site_id)

    @property
    def children(self) -> list[subprocess.Popen[bytes]]:
        return [c for c in (self.supernode, self.superexec) if c is not None]

    def _start_supernode(self) -> None:
        self.supernode = subprocess.Popen(supernode_command(self.site, insecure=self.insecure),
                                          env=child_environment(self.site), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        self._tail = _Tail(self.supernode.stdout)
        self._started_at = time.monotonic()

    def start(self) -> None:
        flower_environment()
        state = self.site.state_path
        state.mkdir(parents=True, exist_ok=True)
        self._start_supernode()
        self.superexec = subprocess.Popen([
            sys.executable, "-m", "medfed.client.daemon", "superexec",
            "--runtime-api-address", f"127.0.0.1:{self.site.runtime_port}", "--parent-pid", str(os.getpid()),
        ], env=child_environment(self.site))
        (state / PID_FILE).write_text(str(os.getpid()), encoding="utf-8")
        if self.console_command:  # a process of its own: its crash never stops training
            self.console = subprocess.Popen(self.console_command, env=child_environment(self.site))
            logger.info("hospital %s: console pid %d", self.site.site_id, self.console.pid)
        assert self.supernode is not None
        logger.info("hospital %s: SuperNode pid %d, SuperExec pid %d", self.site.site_id, self.supernode.pid,
                    self.superexec.pid)

    def stop(self, *_: object) -> None:
        """Stop both children and every ClientApp process the SuperExec started (each by its PID)."""
        self._stopping = True
        for child in [*self.children, *([self.console] if self.console is not None else [])]:
            if child.poll() is None:
                stop_tree(child.pid, timeout=10)
            child.wait()
        (self.site.state_path / PID_FILE).unlink(missing_ok=True)

    def _sleep(self, seconds: float) -> None:
        """Wait, waking at once when a signal stops the daemon."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.2)

    def run(self) -> int:
        """Start, then wait until a signal arrives or the SuperExec exits (the SuperNode is started again after a
        back-off when it exits); returns the exit code."""
        from medfed.client.site_checks import explain_supernode_exit
        from medfed.common.pki import public_key_fingerprint

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start()
        pub = self.site.path(self.site.auth_key).with_suffix(".pub")
        fingerprint = public_key_fingerprint(pub.read_bytes()) if pub.is_file() else "(node.pub not found)"
        wait = BACKOFF_S[0]
        try:
            while not self._stopping:
                if self.superexec is not None and (code := self.superexec.poll()) is not None:
                    logger.error("hospital %s: the SuperExec (pid %d) exited with %d; stopping",
                                 self.site.site_id, self.superexec.pid, code)
                    return code or 1
                if self.supernode is not None and (code := self.supernode.poll()) is not None and not self._stopping:
                    assert self._tail is not None
                    reason, retry = explain_supernode_exit(code, self._tail.text(), self.site, fingerprint)
                    if not retry:
                        logger.error("hospital %s: %s", self.site.site_id, reason)
                        return code or 1
                    if time.monotonic() - self._started_at > STABLE_S:
                        wait = BACKOFF_S[0]
                    logger.warning("hospital %s: %s Starting the SuperNode again in %.0f s.", self.site.site_id,
                                   reason, wait)
                    self._sleep(wait)
                    wait = min(2 * wait, BACKOFF_S[1])
                    if not self._stopping:
                        self._start_supernode()
                    continue
                if self.console is not None and (code := self.console.poll()) is not None:
                    logger.error("hospital %s: the console (pid %d) exited with %d; training goes on (start it "
                                 "again with `medfed hospital console --config %s`)", self.site.site_id,
                                 self.console.pid, code, self.site.source)
                    self.console = None
                self.check_config()
                time.sleep(0.5)
            return 0
        finally:
            self.stop()


def _run_superexec(argv: Sequence[str]) -> None:
    """Flower's SuperExec loop, launching ``medfed-clientapp`` for ClientApp tasks."""
    parser = argparse.ArgumentParser(description="medfed's SuperExec (internal)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    flower_environment()
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.run_superexec import run_superexec

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = script("medfed-clientapp")
    run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the Runtime API listens on 127.0.0.1 only, inside the hospital's machine
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["superexec"]:
        _run_superexec(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m client.daemon superexec --runtime-api-address HOST:PORT")
