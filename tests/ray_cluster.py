"""A throwaway Ray cluster on this machine for tests and benchmarks: a head node and worker nodes, each a
``ray start --block`` process with its own CPUs, a custom resource naming it, its own temporary directory and
explicit free ports (two nodes on one machine must not both want Ray's fixed defaults, nor those of another
engineer's Ray).

Each node's process is started in its own session and stopped by its PID (SIGTERM, then SIGKILL to its process
group): never ``ray stop``, which stops every Ray on the machine. Nothing is written to Ray's default temporary
directory, so ``ray.init()`` elsewhere on the machine never finds this cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["LocalRayCluster", "free_port"]

_NODES_SCRIPT = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + float(sys.argv[3])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"]]
    if len(nodes) >= int(sys.argv[2]) or time.time() > deadline:
        break
    time.sleep(0.2)
print(json.dumps({n["NodeID"]: n["Resources"] for n in nodes}))
ray.shutdown()
"""


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_executable() -> str:
    """The `ray` command of this Python environment (the nodes must run the same medfed as the driver)."""
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class LocalRayCluster:
    """A head and ``workers`` worker nodes with ``cpus`` CPUs each; ``address`` once started."""

    workers: int = 1
    cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # Ray node id -> "head" / "worker-N"
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _root: Path | None = None

    def _start_node(self, name: str, args: list[str]) -> None:
        assert self._root is not None
        temp_dir = self._root / name  # a short path: Ray's socket paths must stay under 107 bytes
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = open(self._root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [
            _ray_executable(), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            f"--num-cpus={self.cpus}", "--num-gpus=0", f"--resources={json.dumps({f'node-{name}': 1})}",
            "--object-store-memory=100000000",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", *args,
        ]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        env.pop("RAY_ADDRESS", None)
        self._procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True))
        log.close()

    def start(self, *, timeout_s: float = 120.0) -> str:
        """Start the nodes; return the head's HOST:PORT once every node has joined."""
        self._root = Path(tempfile.mkdtemp(prefix="mfrc-", dir="/tmp"))
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start_node("head", ["--head", f"--port={port}", "--include-dashboard=false",
                                  f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                                  "--node-ip-address=127.0.0.1"])
        deadline = time.time() + timeout_s
        while True:  # the head's GCS answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or self._procs[0].poll() is not None:
                    raise RuntimeError(f"the Ray head did not start: {self.log('head')}") from None
                time.sleep(0.2)
        for i in range(self.workers):
            self._start_node(f"worker{i}", [f"--address={self.address}", "--node-ip-address=127.0.0.1"])
        found = self._alive_nodes(1 + self.workers, deadline - time.time())
        if len(found) < 1 + self.workers:
            raise RuntimeError(f"{len(found)} of {1 + self.workers} Ray nodes joined: "
                               + " | ".join(self.log(n) for n in ("head", "worker0")))
        for node_id, resources in found.items():
            self.nodes[node_id] = next(k[len("node-"):] for k in resources if k.startswith("node-"))
        return self.address

    def _alive_nodes(self, expected: int, timeout_s: float) -> dict[str, dict[str, float]]:
        """The alive nodes' resources by node id, once ``expected`` have joined (or the time is up); a driver that
        could not connect (a loaded machine can time Ray's connection out) tries again until then."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        env.pop("RAY_ADDRESS", None)
        deadline = time.time() + max(timeout_s, 1)
        while True:
            left = max(deadline - time.time(), 1)
            done = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, self.address, str(expected), str(left)],
                                  capture_output=True, text=True, env=env, timeout=left + 60)
            if done.returncode == 0:
                return dict(json.loads(done.stdout.strip().splitlines()[-1]))
            if time.time() > deadline:
                raise RuntimeError(f"listing the Ray nodes failed: {done.stderr[-2000:]}")
            time.sleep(1)

    def running(self) -> bool:
        """Whether every node's `ray start` process still runs."""
        return bool(self._procs) and all(proc.poll() is None for proc in self._procs)

    def log(self, name: str) -> str:
        """The tail of a node's `ray start` output."""
        path = (self._root or Path("/nonexistent")) / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else "(no log)"

    def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop every node this object started, by PID (workers first), and remove its temporary directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
        deadline = time.time() + grace_s
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        self._procs.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
