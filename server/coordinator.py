"""The coordinator daemon: a Flower SuperLink with TLS and SuperNode authentication, and the runs it launches.

A coordinator directory holds everything the coordinator owns::

    ca.crt ca.key            the deployment's certificate authority (hospitals get ca.crt only; keep ca.key
                             offline once the server certificate is issued)
    server.pem server.key    the SuperLink's TLS certificate and key (``tls_dir`` may hold ca.crt, server.pem
                             and server.key elsewhere, e.g. container secrets under /run/secrets)
    state.db                 the SuperLink's persistent state (registered hospitals, runs)
    flwr-home/config.toml    the connection Flower's CLI uses to reach this SuperLink
    runs/                    one run directory per training run (config, metrics.jsonl, summary.json, checkpoints)
    runs.json                run id -> run directory, overrides, and whether it was stopped or resumed
    superlink.log            the SuperLink's log
    hospitals.json           node id -> the name and key fingerprint each hospital was registered with

The SuperLink always runs with SuperNode authentication, with runtime dependency installation disabled, and with
TLS unless ``insecure=True`` (local experiments only). Hospital registration, run launch, listing, logs and stop go
through Flower's own CLI against this SuperLink (``flwr supernode register``, ``flwr run``, ``flwr ls``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.common import keys
from medfed.common.atomic import atomic_write
from medfed.common.config import RUN_CONFIG_OVERRIDES, overrides_from_run_config
from medfed.common.environment import flower_environment, script
from medfed.common.errors import ConfigError, ServiceUnavailable
from medfed.common.processes import port_taken, split_address, stop_tree

__all__ = ["AUTO_RESUMED_AT", "CONNECTION", "Coordinator", "FlowerCommandError", "InterruptedRun", "listen_host"]

logger = logging.getLogger(__name__)

CONNECTION = "medfed"  # the SuperLink connection's name in flwr-home/config.toml


AUTO_RESUMED_AT = "auto-resumed-at"  # runs.json: the rounds a run had done when a coordinator start resumed it


def listen_host(address: str) -> str | None:
    """The one host a SuperLink listening at ``address`` (host:port, [v6]:port) listens on; None when it listens on
    all interfaces (``0.0.0.0``, ``::`` or no host)."""
    host, _ = split_address(address, host_required=False)
    return None if host in ("", "0.0.0.0", "::") else host


class FlowerCommandError(ConfigError):
    """A Flower CLI call against the coordinator's SuperLink failed."""


@dataclass(frozen=True)
class InterruptedRun:
    """A run that has not finished and is not running: its Flower run id, directory, overrides and rounds done."""

    run_id: int
    run_dir: Path
    overrides: list[str]
    rounds_done: int
    stalled: bool = False  # resumed at start-up before, and no round finished since: it fails by itself


class Coordinator:
    """One coordinator directory and the SuperLink serving it."""

    def __init__(
        self, directory: Path, *, address: str = "127.0.0.1:9093", insecure: bool = False, tls_dir: Path | None = None
    ) -> None:
        self.dir = Path(directory).expanduser().resolve()
        self.address = address
        self.insecure = insecure
        self.tls_dir = Path(tls_dir).expanduser().resolve() if tls_dir is not None else self.dir

    # --- files --------------------------------------------------------------------------------------------------
    @property
    def flwr_home(self) -> Path:
        return self.dir / "flwr-home"

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    def _require_tls_files(self) -> None:
        if self.insecure:
            return
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (self.tls_dir / name).is_file():
                raise ConfigError(
                    f"{name} is missing in {self.tls_dir}; create the coordinator's certificates first with "
                    f"`medfed coordinator init --dir {self.dir} --host HOST`."
                )

    @property
    def local_address(self) -> str:
        """Where clients on this machine reach the SuperLink: its listening address, with a listen-on-all host
        (``0.0.0.0``, ``::`` or none) replaced by the loopback address, as Flower's SuperExec does. The server
        certificate always covers the loopback addresses (:func:`common.pki.create_server_certificate`)."""
        if listen_host(self.address) is not None:
            return self.address
        host, port = split_address(self.address, host_required=False)
        return f"[::1]:{port}" if host == "::" else f"127.0.0.1:{port}"

    def write_connection(self) -> Path:
        """Write ``flwr-home/config.toml`` so Flower's CLI reaches this SuperLink (over TLS, verified by our CA)."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.local_address}"']
        lines.append("insecure = true" if self.insecure else f'root-certificates = "{self.tls_dir / "ca.crt"}"')
        path = self.flwr_home / "config.toml"
        with atomic_write(path, binary=False) as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def environment(self) -> dict[str, str]:
        flower_environment()
        return {**os.environ, "FLWR_HOME": str(self.flwr_home)}

    # --- the SuperLink ------------------------------------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        host, port = split_address(self.address, host_required=False)  # Flower puts an IPv6 host in brackets
        # Flower's flower-superlink, its SQLite state waiting longer for a lock (medfed.server.superlink)
        command = [sys.executable, "-m", "medfed.server.superlink", "--enable-supernode-auth", "--database",
                   str(self.dir / "state.db"),
                   "--disable-runtime-dependency-installation", "--host", host or "0.0.0.0", "--port", str(port)]
        if self.insecure:
            command.append("--insecure")
        else:
            tls = self.tls_dir
            command += ["--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem"),
                        "--ssl-keyfile", str(tls / "server.key")]
        return command

    def start(self, *, stdout: Any = None) -> subprocess.Popen[bytes]:
        """Start the SuperLink (a child process; the caller stops it and its helpers with
        :func:`common.processes.stop_tree`) and wait until it answers."""
        self._require_tls_files()
        if port_taken(self.address):
            raise ServiceUnavailable(self._port_in_use())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(exist_ok=True)
        self.write_connection()
        log = stdout if stdout is not None else (self.dir / "superlink.log").open("ab")
        process = subprocess.Popen(self.superlink_command(), env=self.environment(), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=self.dir)
        (self.dir / "superlink.pid").write_text(str(process.pid), encoding="utf-8")
        try:
            self.wait_ready(process)
        except BaseException:  # a SuperLink that never answered is not left running
            if process.poll() is None:
                stop_tree(process.pid)
            process.wait()
            raise
        return process

    def wait_ready(self, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
        """Block until the SuperLink answers Flower's CLI (or fail naming the log)."""
        if not (self.flwr_home / "config.toml").is_file():
            # without its config Flower's CLI would write a default one and start a local SuperLink of its own
            self.write_connection()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                if "address already in use" in self._log_tail():  # taken between the check and the bind
                    raise ServiceUnavailable(self._port_in_use())
                raise ServiceUnavailable(f"The SuperLink exited with {process.returncode}; see "
                                         f"{self.dir / 'superlink.log'}.")
            try:
                self.flwr(["ls", CONNECTION], timeout=20)
                return
            except FlowerCommandError as exc:
                last = str(exc)
                time.sleep(0.5)
        hint = ""
        if "certificate" in last.lower():
            hint = (f" The server certificate does not cover {self.local_address}: issue a new one with `medfed "
                    f"coordinator renew-cert --dir {self.dir} --host HOST` (it always covers the loopback addresses "
                    "too) and start again.")
        raise ServiceUnavailable(
            f"The SuperLink did not answer at {self.local_address} within {timeout:.0f} s (last answer: "
            f"{last or 'none'}).{hint} See {self.dir / 'superlink.log'}.")

    def _port_in_use(self) -> str:
        _, port = split_address(self.address, host_required=False)
        return (f"The SuperLink cannot listen at {self.address}: port {port} is in use by another process (another "
                f"coordinator?). Stop that process (`ss -ltnp 'sport = :{port}'` names it), or give this coordinator "
                "another port: `medfed coordinator init --address HOST:PORT` in a new directory, and tell the "
                "hospitals the new address.")

    def _log_tail(self) -> str:
        try:
            with (self.dir / "superlink.log").open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4000))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # --- Flower's CLI -------------------------------------------------------------------------------------------
    def flwr(self, args: Sequence[str], *, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS... medfed --format json`` against this SuperLink; return its JSON answer."""
        command = [script("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(command, env=self.environment(), capture_output=True, text=True, timeout=timeout,
                                  cwd=self.dir)
        except subprocess.TimeoutExpired:  # e.g. something else listens at the address and never answers
            raise FlowerCommandError(f"`flwr {' '.join(args[:2])}` got no answer from {self.local_address} within "
                                     f"{timeout:.0f} s") from None
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):]) if "{" in done.stdout else {}
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            reason = answer.get("error-message") or (done.stderr or done.stdout).strip()[-800:]
            raise FlowerCommandError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
        return answer

    def register(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a hospital's SuperNode public key; returns the node id Flower assigned."""
        from medfed.common.pki import public_key_fingerprint

        public_key = Path(public_key).expanduser().resolve()  # Flower's CLI runs in the coordinator directory
        if not public_key.is_file():
            raise ConfigError(f"{public_key} does not exist; ask the hospital for the node.pub `medfed hospital init` wrote.")
        fingerprint = public_key_fingerprint(public_key.read_bytes())  # a clear error for anything but a public key
        args = ["supernode", "register", str(public_key), CONNECTION]
        if name:
            args += ["--name", name]
        node_id = int(self.flwr(args)["node-id"])
        names = self.node_names()
        names[node_id] = {"name": name or f"node-{node_id}", "fingerprint": fingerprint, "registered": time.time()}
        self._write_names(names)
        return node_id

    def unregister(self, node_id: int) -> None:
        """Revoke a hospital: its key can no longer connect (nobody else's credentials change)."""
        self.flwr(["supernode", "unregister", str(node_id), CONNECTION])
        names = self.node_names()
        if names.pop(node_id, None) is not None:
            self._write_names(names)

    @property
    def names_path(self) -> Path:
        return self.dir / "hospitals.json"

    def node_names(self) -> dict[int, dict[str, Any]]:
        """The hospitals this coordinator registered, by node id: their names and key fingerprints (Flower keeps
        no name of its own)."""
        if not self.names_path.is_file():
            return {}
        return {int(k): v for k, v in json.loads(self.names_path.read_text(encoding="utf-8")).items()}

    def _write_names(self, names: dict[int, dict[str, Any]]) -> None:
        with atomic_write(self.names_path, binary=False) as handle:
            json.dump({str(k): v for k, v in sorted(names.items())}, handle, indent=1)

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr(["supernode", "list", CONNECTION]).get("nodes", []))

    def launch(self, app_dir: Path, run_config: dict[str, Any], *, note: dict[str, Any] | None = None) -> int:
        """Submit a run of the app in ``app_dir`` with ``run_config``; returns Flower's run id. ``note`` is kept
        with the run in ``runs.json``."""
        toml = self.dir / ".run-config.toml"
        body = "\n".join(f'"{k}" = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}'
                         for k, v in run_config.items())
        with atomic_write(toml, binary=False) as handle:
            handle.write(body + "\n")
        answer = self.flwr(["run", str(app_dir), CONNECTION, "--run-config", str(toml)])
        run_id = int(answer["run-id"])
        self._remember_run(run_id, run_config, note)
        return run_id

    def _remember_run(self, run_id: int, run_config: dict[str, Any], note: dict[str, Any] | None = None) -> None:
        index = self.runs()
        run_dir = run_config.get(keys.RUN_DIR)
        for earlier in index.values():  # a resumed run supersedes the earlier runs writing the same directory
            if earlier.get(keys.RUN_DIR) == run_dir and not earlier.get("stopped"):
                earlier.setdefault("resumed-as", run_id)
        index[str(run_id)] = {k: v for k, v in run_config.items() if k in (keys.RUN_DIR, keys.RUN_T0, RUN_CONFIG_OVERRIDES)}
        index[str(run_id)].update(note or {})
        self._write_runs(index)

    def _write_runs(self, index: dict[str, dict[str, Any]]) -> None:
        with atomic_write(self.dir / "runs.json", binary=False) as handle:
            json.dump(index, handle, indent=2)

    def runs(self) -> dict[str, dict[str, Any]]:
        path = self.dir / "runs.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def status(self, run_id: int | None = None) -> list[dict[str, Any]]:
        args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
        return list(self.flwr(args).get("runs", []))

    def stop_run(self, run_id: int) -> None:
        """Stop a run; it is marked stopped so that a coordinator restart does not resume it."""
        self.flwr(["stop", str(run_id), CONNECTION])
        index = self.runs()
        if str(run_id) in index:
            index[str(run_id)]["stopped"] = True
            self._write_runs(index)

    def interrupted_runs(self) -> list[InterruptedRun]:
        """Runs that neither finished (no summary.json) nor were stopped nor already resumed. When the coordinator
        starts, no ServerApp of an earlier SuperLink still runs, so these were cut off by a coordinator stop or
        crash, or failed by themselves (``stalled``: auto-resumed before at the same number of rounds)."""
        from medfed.server.runs import RunDirectory  # torch comes with it: only when a coordinator starts

        out = []
        for rid, entry in self.runs().items():
            if entry.get("stopped") or "resumed-as" in entry or keys.RUN_DIR not in entry:
                continue
            run_dir = RunDirectory(Path(entry[keys.RUN_DIR]))
            if not run_dir.summary_path.exists():
                rounds = len(run_dir.read_metrics())
                out.append(InterruptedRun(int(rid), run_dir.path, overrides_from_run_config(entry), rounds,
                                          stalled=entry.get(AUTO_RESUMED_AT) == rounds))
        return out
