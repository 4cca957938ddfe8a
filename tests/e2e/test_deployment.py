"""A real deployment on 127.0.0.1: `medfed coordinator start` (SuperLink, TLS, SuperNode authentication) and
`medfed hospital start` daemons (SuperNode + medfed's gate), driven through the `medfed` CLI.

Every process is started in its own session and stopped by its PID (its process group) in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MEDFED = str(Path(sys.executable).parent / "medfed")
RECIPE = ["dataset=synthetic", "dataset.n_train=300", "dataset.n_test=100", "federation.hospitals=3",
          "train.rounds=2", "model.width=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _medfed(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([MEDFED, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"medfed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@dataclass
class Deployment:
    root: Path
    coord: Path
    address: str
    env: dict[str, str]
    sites: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([MEDFED, *args], env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    home = tmp_path / "flwr-home"
    env = _env(home)
    address = f"127.0.0.1:{_free_port()}"
    dep = Deployment(tmp_path, tmp_path / "coord", address, env)
    try:
        _medfed(["coordinator", "init", "--dir", str(dep.coord), "--host", "127.0.0.1", "--address", address], env)
        dep.spawn(["coordinator", "start", "--dir", str(dep.coord)], tmp_path / "coordinator.log")
        from server.coordinator import Coordinator

        Coordinator(dep.coord, address=address).wait_ready(timeout=90)
        for index in range(3):
            site = tmp_path / f"site-{index}"
            data = tmp_path / f"data-{index}.npz"
            _medfed(["hospital", "export-demo", "--index", str(index), "--out", str(data), *RECIPE], env)
            init = ["hospital", "init", "--dir", str(site), "--site-id", f"hospital-{'abc'[index]}", "--data", str(data),
                    "--n-classes", "2", "--superlink", address, "--ca", str(dep.coord / "ca.crt"),
                    "--runtime-port", str(_free_port())]
            if index < 2:  # the third hospital approves nothing
                init.append("--approve-installed")
            _medfed(init, env)
            _medfed(["hospitals", "register", str(site / "node.pub"), "--dir", str(dep.coord)], env)
            dep.spawn(["hospital", "start", "--config", str(site / "site.yaml")], tmp_path / f"site-{index}.log")
            dep.sites.append(site)
        yield dep
    finally:
        for process in reversed(dep.processes):
            dep.stop(process)


def _wait_for(path: Path, timeout: float, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        dead = [p.args for p in processes if p.poll() is not None]
        assert not dead, f"a daemon exited early: {dead}"
        time.sleep(1)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_two_round_training_over_tls_with_node_auth(deployment: Deployment) -> None:
    # Execute: a 2-round run launched through the CLI; the third hospital has approved no bundle
    run_dir = deployment.root / "run"
    _medfed(["train", "--dir", str(deployment.coord), "--run-dir", str(run_dir), *RECIPE,
             "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2", "strategy.min_available_nodes=3"],
            deployment.env)
    _wait_for(run_dir / "summary.json", 400, deployment.processes)

    # Assert: the same outputs as a simulation
    for name in ("config.yaml", "overrides.json", "metrics.jsonl", "summary.json", "model.pt"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
    assert summary["best"]["test"]["auc"] > 0.6
    # the unapproved hospital was dropped every round, with its reason
    for line in lines:
        reasons = [d["reason"] for d in line["dropped"]]
        assert any("not in approved_apps" in r for r in reasons), line["dropped"]

    from client.gate import read_audit

    # the refusing hospital audited its refusal and sent nothing but error replies
    refused = read_audit(deployment.sites[2] / "state")
    assert any(e["event"] == "refused-app" for e in refused)
    assert all(e["error"] for e in refused if e["event"] == "sent")
    # every message the training hospitals sent is in their audit log, and carries only weights and scalars
    for site in deployment.sites[:2]:
        sent = [e for e in read_audit(site / "state") if e["event"] == "sent"]
        assert sorted((e["round"], e["type"]) for e in sent) == [
            (1, "evaluate"), (1, "train"), (2, "evaluate"), (2, "train")]
        for entry in sent:
            assert entry["error"] is None and entry["bytes"] > 0 and len(entry["sha256"]) == 64
            kinds = {name: rec["kind"] for name, rec in entry["records"].items()}
            assert set(kinds.values()) <= {"ArrayRecord", "MetricRecord", "ConfigRecord"}
            for rec in entry["records"].values():
                if rec["kind"] == "ConfigRecord":
                    assert rec["keys"] == ["site-id"] and rec["types"] == ["str"]


def test_connections_without_trust_or_tls_are_refused(deployment: Deployment) -> None:
    from server.coordinator import Coordinator, FlowerCommandError

    # a client that does not know the CA certificate (system trust store only) cannot connect
    untrusted = Coordinator(deployment.root / "untrusted", address=deployment.address)
    untrusted.dir.mkdir()
    (untrusted.dir / "ca.crt").write_bytes(b"")
    untrusted.flwr_home.mkdir(parents=True)
    (untrusted.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "medfed"\n\n[superlink.medfed]\naddress = "{deployment.address}"\n')
    with pytest.raises(FlowerCommandError):
        untrusted.flwr(["ls", "medfed"], timeout=60)
    # a plaintext client cannot talk to the TLS coordinator
    plaintext = Coordinator(deployment.root / "plaintext", address=deployment.address, insecure=True)
    plaintext.write_connection()
    with pytest.raises(FlowerCommandError):
        plaintext.flwr(["ls", "medfed"], timeout=60)
    # an unregistered hospital key is rejected: its SuperNode never comes online
    stranger = deployment.root / "stranger"
    _medfed(["hospital", "init", "--dir", str(stranger), "--site-id", "stranger", "--data",
             str(deployment.root / "data-0.npz"), "--n-classes", "2", "--superlink", deployment.address, "--ca",
             str(deployment.coord / "ca.crt"), "--runtime-port", str(_free_port())], deployment.env)
    log = deployment.root / "stranger.log"
    process = deployment.spawn(["hospital", "start", "--config", str(stranger / "site.yaml")], log)
    time.sleep(12)
    nodes = Coordinator(deployment.coord, address=deployment.address).nodes()
    assert len(nodes) == 3  # only the registered ones
    deployment.stop(process)
    assert "authentic" in log.read_text(errors="replace").lower() or process.returncode != 0
