"""The hospital daemon: a Flower SuperNode for the site, with medfed's gate in front of every ClientApp.

``medfed hospital start --config site.yaml`` runs two child processes and watches them:

- ``flower-supernode`` in ``process`` isolation: TLS to the coordinator (verified with the coordinator's CA
  certificate), SuperNode authentication with the site's key, the site's node config (site config path, privacy
  cap, state directory), unlimited reconnection attempts (network blips and coordinator restarts), runtime
  dependency installation off (Flower's default for SuperNodes, never switched on here);
- Flower's SuperExec loop, launching ``medfed-clientapp`` (:mod:`client.gate`) instead of ``flwr-clientapp`` for
  each message, so every bundle is checked against the site's approved list and every reply is audited.

Both children, and any ClientApp process still running, are stopped by PID when the daemon stops (SIGTERM /
SIGINT) or when one of them exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from medfed.client.site import SiteConfig, node_config_for
from medfed.common.environment import flower_environment, script
from medfed.common.errors import ConfigError
from medfed.common.processes import stop_tree

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


class HospitalDaemon:
    """Starts and watches a hospital's SuperNode and SuperExec; stops both by PID."""

    def __init__(self, site: SiteConfig, *, insecure: bool = False) -> None:
        self.site = site
        self.insecure = insecure
        self.children: list[subprocess.Popen[bytes]] = []
        self._stopping = False

    def start(self) -> None:
        flower_environment()
        state = self.site.state_path
        state.mkdir(parents=True, exist_ok=True)
        env = child_environment(self.site)
        supernode = subprocess.Popen(supernode_command(self.site, insecure=self.insecure), env=env)
        self.children.append(supernode)
        superexec = subprocess.Popen([
            sys.executable, "-m", "medfed.client.daemon", "superexec",
            "--runtime-api-address", f"127.0.0.1:{self.site.runtime_port}", "--parent-pid", str(os.getpid()),
        ], env=env)
        self.children.append(superexec)
        (state / PID_FILE).write_text(str(os.getpid()), encoding="utf-8")
        logger.info("hospital %s: SuperNode pid %d, SuperExec pid %d", self.site.site_id, supernode.pid, superexec.pid)

    def stop(self, *_: object) -> None:
        """Stop both children and every ClientApp process the SuperExec started (each by its PID)."""
        self._stopping = True
        for child in self.children:
            if child.poll() is None:
                stop_tree(child.pid, timeout=10)
            child.wait()
        (self.site.state_path / PID_FILE).unlink(missing_ok=True)

    def run(self) -> int:
        """Start, then wait until a signal arrives or a child exits; returns the exit code."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start()
        try:
            while not self._stopping:
                for child in self.children:
                    code = child.poll()
                    if code is not None:
                        logger.error("hospital %s: child pid %d exited with %d; stopping",
                                     self.site.site_id, child.pid, code)
                        return code or 1
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
