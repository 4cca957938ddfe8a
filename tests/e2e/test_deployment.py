"""A real deployment on 127.0.0.1: `medfed coordinator start` (SuperLink, TLS, SuperNode authentication) and
`medfed hospital start` daemons (SuperNode + medfed's gate), driven through the `medfed` CLI.

Every process is started in its own session and stopped by its PID (its process group) in ``finally``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medfed.client.daemon import PID_FILE
from medfed.common.errors import ServiceUnavailable

pytestmark = pytest.mark.e2e

MEDFED = str(Path(sys.executable).parent / "medfed")
RECIPE = ["dataset=synthetic", "dataset.n_train=300", "dataset.n_test=100", "federation.hospitals=3",
          "train.rounds=2", "model.width=8", "train.local_epochs=1"]  # (one epoch: what DP-SGD takes anyway)


def _free_port() -> int:
    """A port free now (the kernel's pick for port 0); another process may take it before medfed binds it, so each
    start that binds one retries with another when medfed says it is taken (:class:`PortTaken`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


IN_USE = "is in use by another process"  # medfed's words when a port it would listen at is taken
TRIES = 3


class PortTaken(AssertionError):
    """A daemon refused to start because its port was taken between ``_free_port()`` and its bind."""


def _retried(start: Callable[[int], None], what: str) -> None:
    """``start(attempt)``, tried again (attempt 2, 3: with a new port) while medfed says its port was taken."""
    for attempt in range(1, TRIES + 1):
        try:
            return start(attempt)
        except PortTaken:
            if attempt == TRIES:
                raise
            print(f"{what}: its port was taken meanwhile; trying another ({attempt}/{TRIES})")


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
    node_ids: list[int] = field(default_factory=list)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    coordinator: subprocess.Popen[bytes] | None = None
    listen: str = ""  # where the SuperLink listens, when not at ``address``

    def start_coordinator(self, *extra: str) -> Path:
        """``coordinator start [EXTRA...]``, waiting until its SuperLink answers; returns its log file."""
        from medfed.server.coordinator import Coordinator

        log = self.root / f"coordinator-{len(self.processes)}.log"
        self.coordinator = self.spawn(["coordinator", "start", "--dir", str(self.coord), *extra], log)
        try:
            Coordinator(self.coord, address=self.listen or self.address).wait_ready(self.coordinator, timeout=90)
        except ServiceUnavailable:
            if IN_USE in log.read_text(errors="replace"):
                raise PortTaken(log.read_text(errors="replace")) from None
            raise
        return log

    def start_hospital(self, site: Path, *extra: str) -> Path:
        """``hospital start [EXTRA...]``, waiting until its daemon has started (its PID file) or exited; returns
        the daemon's log file."""
        log = self.root / f"{site.name}-{len(self.processes)}.log"
        daemon = self.spawn(["hospital", "start", "--config", str(site / "site.yaml"), *extra], log)
        pid_file = site / "state" / PID_FILE
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text().strip() == str(daemon.pid)):
            if daemon.poll() is not None:
                text = log.read_text(errors="replace")
                raise (PortTaken if IN_USE in text else AssertionError)(f"hospital start exited:\n{text}")
            assert time.monotonic() < deadline, f"hospital start did not start its daemon:\n{log.read_text()}"
            time.sleep(0.2)
        self.daemons.append(daemon)
        return log

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


@contextlib.contextmanager
def _deploy(root: Path, approved: list[bool], host: str = "127.0.0.1", listen_all: bool = False,
            coordinator_args: Sequence[str] = (), hospital_args: Callable[[int], list[str]] | None = None,
            ) -> Iterator[Deployment]:
    """A coordinator and one hospital per entry of ``approved`` (whether it approves this installation's bundle),
    all started through the CLI; every process stopped by PID afterwards. ``host``: the name the coordinator's
    certificate is issued for (the hospitals here still dial 127.0.0.1); ``listen_all``: the SuperLink listens on
    0.0.0.0, as in the compose and systemd set-ups; ``coordinator_args`` and ``hospital_args(index)``: more options
    of `coordinator start` and of each `hospital start`."""
    home = root / "flwr-home"
    env = _env(home)
    dep = Deployment(root, root / "coord", "", env)

    def start_coordinator(attempt: int) -> None:  # a new port each time
        port = _free_port()
        dep.address, dep.listen = f"127.0.0.1:{port}", f"0.0.0.0:{port}" if listen_all else ""
        shutil.rmtree(dep.coord, ignore_errors=True)
        _medfed(["coordinator", "init", "--dir", str(dep.coord), "--host", host, "--address",
                 dep.listen or dep.address], env)
        dep.start_coordinator(*coordinator_args)

    try:
        _retried(start_coordinator, "the coordinator")
        for index, approve in enumerate(approved):
            site = root / f"site-{index}"
            data = root / f"data-{index}.npz"
            _medfed(["hospital", "export-demo", "--index", str(index), "--out", str(data), *RECIPE], env)
            init = ["hospital", "init", "--dir", str(site), "--site-id", f"hospital-{'abc'[index]}", "--data-path", str(data),
                    "--n-classes", "2", "--superlink", dep.address, "--ca", str(dep.coord / "ca.crt"),
                    "--runtime-port", str(_free_port()), "--no-require-dp"]  # these sites also run non-DP recipes
            if approve:
                init.append("--approve-installed")
            if importlib.util.find_spec("torchcsprng") is None:  # CI: no secure RNG, so the DP runs here opt out
                init.append("--no-secure-rng")  # (with torchcsprng installed they run in Opacus' secure_mode)
            _medfed(init, env)
            out = _medfed(["hospitals", "register", str(site / "node.pub"), "--dir", str(dep.coord), "--name",
                           f"hospital-{'abc'[index]}"], env).stdout
            dep.node_ids.append(int(re.search(r"as\s+node\s+(\d+)", out).group(1)))

            def start_hospital(attempt: int, site: Path = site) -> None:
                config = site / "site.yaml"
                if attempt > 1:  # the port hospital init wrote was taken: another one
                    text = config.read_text()
                    config.write_text(re.sub(r"(?m)^runtime_port: \d+$", f"runtime_port: {_free_port()}", text))
                dep.start_hospital(site, *(hospital_args(index) if hospital_args else []))

            _retried(start_hospital, f"hospital {index}")
            dep.sites.append(site)
        yield dep
    finally:
        for process in reversed(dep.processes):
            dep.stop(process)
    # Flower's CLI starts a detached local SuperLink of its own when it finds no connection config: never here
    assert not list(root.rglob("local-superlink")), "a Flower CLI call started a local SuperLink"


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Three hospitals; the third approves no bundle. The coordinator is set up as a real one is: its certificate
    names a host (not an IP address) and it listens on all interfaces; its own clients still find it ready."""
    with _deploy(tmp_path, [True, True, False], host="coordinator.example.org", listen_all=True) as dep:
        yield dep


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
    launched = _medfed(["train", "--dir", str(deployment.coord), "--run-dir", str(run_dir), *RECIPE,
                        "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2",
                        "strategy.min_available_nodes=3"], deployment.env).stdout
    run_id = re.search(r"run\s+(\d+)\s+launched", launched).group(1)
    _wait_for(run_dir / "summary.json", 400, deployment.processes)

    # Assert: the same outputs as a simulation
    for name in ("config.yaml", "overrides.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    # the coordinator lists the run as finished and shows the ServerApp's log
    # (Flower marks the run finished once the ServerApp process has exited, a moment after summary.json is written)
    deadline = time.time() + 60
    while True:
        listed = _medfed(["runs", "list", "--dir", str(deployment.coord)], deployment.env).stdout
        if "finished" in listed or time.time() > deadline:
            break
        time.sleep(1)
    assert run_id[:12] in listed and "finished" in listed
    runs = json.loads(_medfed(["runs", "list", "--dir", str(deployment.coord), "--json"], deployment.env).stdout)
    assert {"run-id": run_id, "run-dir": str(run_dir.resolve())}.items() <= runs[0].items()  # uncut
    hospitals = json.loads(_medfed(["hospitals", "list", "--dir", str(deployment.coord), "--json"],
                                   deployment.env).stdout)
    assert sorted(h["name"] for h in hospitals) == ["hospital-a", "hospital-b", "hospital-c"]
    assert all(h["fingerprint"].startswith("SHA256:") and h["status"] == "online" for h in hospitals)
    logs = _medfed(["runs", "logs", run_id, "--dir", str(deployment.coord)], deployment.env).stdout
    assert "[ROUND 2/2]" in logs, logs[-2000:]  # Flower's round log of the ServerApp
    assert logs.count("[ROUND 2/2]") == 1, logs[-4000:]  # each line once
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
    assert summary["best"]["test"]["auc"] >= 0.95  # measured 0.9916-0.9996 here (2026-12-06)
    assert summary["calibration"]["sites_fitted"] == ["hospital-a", "hospital-b"]  # the refusing one left out
    assert len(summary["calibration"]["dropped"]) == 2  # hospital-c, in both final stages
    # the unapproved hospital was dropped every round, with its reason
    for line in lines:
        reasons = [d["reason"] for d in line["dropped"]]
        assert any("not in approved_apps" in r for r in reasons), line["dropped"]

    from medfed.client.gate import read_audit

    # the refusing hospital audited its refusal and sent nothing but error replies
    refused = read_audit(deployment.sites[2] / "state")
    assert any(e["event"] == "refused-app" for e in refused)
    assert all(e["error"] for e in refused if e["event"] == "sent")
    # every message the training hospitals sent is in their audit log, and carries only weights and scalars
    for site in deployment.sites[:2]:
        sent = [e for e in read_audit(site / "state") if e["event"] == "sent"]
        assert sorted((e["round"] or 0, e["stage"] or "", e["type"]) for e in sent) == [
            (0, "calibrate", "evaluate"), (0, "reliability", "evaluate"),  # temperature scaling after the rounds
            (1, "evaluate", "evaluate"), (1, "train", "train"), (2, "evaluate", "evaluate"), (2, "train", "train")]
        for entry in sent:
            assert entry["error"] is None and entry["bytes"] > 0 and len(entry["sha256"]) == 64
            kinds = {name: rec["kind"] for name, rec in entry["records"].items()}
            assert set(kinds.values()) <= {"ArrayRecord", "MetricRecord", "ConfigRecord"}
            for rec in entry["records"].values():
                if rec["kind"] == "ConfigRecord":
                    assert rec["keys"] == ["site-id"] and rec["types"] == ["str"]


def test_connections_without_trust_or_tls_are_refused(deployment: Deployment) -> None:
    from medfed.server.coordinator import Coordinator, FlowerCommandError

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
    # an unregistered hospital key is rejected: its SuperNode does not come online
    stranger = deployment.root / "stranger"
    _medfed(["hospital", "init", "--dir", str(stranger), "--site-id", "stranger", "--data-path",
             str(deployment.root / "data-0.npz"), "--n-classes", "2", "--superlink", deployment.address, "--ca",
             str(deployment.coord / "ca.crt"), "--runtime-port", str(_free_port())], deployment.env)
    log = deployment.root / "stranger.log"
    process = deployment.spawn(["hospital", "start", "--config", str(stranger / "site.yaml")], log)
    coordinator = Coordinator(deployment.coord, address=deployment.address)
    deadline = time.monotonic() + 60
    while "refused to activate" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(1)
    text = log.read_text(errors="replace")
    assert len(coordinator.nodes()) == 3  # only the registered ones
    # the hospital learns why in one line (with its key's fingerprint) and keeps trying instead of exiting
    assert "not registered there" in text and "SHA256:" in text and "Starting the SuperNode again" in text, text[-2000:]
    assert process.poll() is None, text[-2000:]
    # once the coordinator registers its key, it comes online without a restart at the hospital
    node_id = coordinator.register(stranger / "node.pub", name="stranger")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(str(n.get("node-id")) == str(node_id) and n.get("status") == "online" for n in coordinator.nodes()):
            break
        time.sleep(2)
    else:
        raise AssertionError(f"the registered stranger never came online:\n{log.read_text(errors='replace')[-2000:]}")
    assert process.poll() is None


def _clientapp_running(daemon: subprocess.Popen[bytes]) -> bool:
    """Whether the hospital's SuperExec has started a ClientApp process (it has pulled a message)."""
    from medfed.common.processes import descendants

    for pid in descendants(daemon.pid):
        try:
            if b"medfed-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_federated_ssl_pretraining_in_a_deployment(tmp_path: Path) -> None:
    # Prepare: a coordinator and two hospitals over TLS
    with _deploy(tmp_path, [True, True]) as dep:
        run_dir = dep.root / "ssl"

        # Execute: masked image modelling under DP at the hospitals, one round
        _medfed(["train", "--dir", str(dep.coord), "--run-dir", str(run_dir), *RECIPE, "train.rounds=1",
                 "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2", "strategy.min_available_nodes=2",
                 "task=ssl", "ssl.method=mim", "privacy=dp", "privacy.target_epsilon=8",
                 # these research hospitals (--no-require-dp) may release the exact pretext loss: on ~20 validation
                 # images a site's noised loss can read 0 (metered SSL evaluation: tests/unit/client/test_privacy.py)
                 "privacy.exact_metrics=true"], dep.env)
        _wait_for(run_dir / "summary.json", 400, dep.processes)

    # Assert: the encoder was trained and selected on the hospitals' pretext loss, each hospital's epsilon recorded
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["best"]["val"]["loss"] > 0
    assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
    assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"].values())
    assert "calibration" not in summary and -1 <= summary["representation"]["silhouette"] <= 1
    from medfed.common.models import load_checkpoint

    arrays, _ = load_checkpoint(run_dir / "best_model.pt")
    assert any(k.startswith("decoder.") for k in arrays) and any(k.startswith("encoder.") for k in arrays)


def test_distributed_dp_over_tls_with_three_hospitals(tmp_path: Path) -> None:
    """privacy=distributed_dp in a real deployment: 3 hospitals send integer sums with Skellam shares through SecAgg+
    over TLS; each ledger records the Skellam rounds; the train replies carry masked integers and scalars only."""
    with _deploy(tmp_path, [True, True, True]) as dep:
        # Execute: 2 rounds, every hospital in every sum
        run_dir = tmp_path / "run"
        _medfed(["train", "--dir", str(dep.coord), "--run-dir", str(run_dir), *RECIPE, "privacy=distributed_dp",
                 "privacy.target_epsilon=4", "train.rounds=2", "strategy.min_available_nodes=3"], dep.env)
        _wait_for(run_dir / "summary.json", 600, dep.processes)

        # Assert: both rounds applied, every hospital charged, the assumptions stated
        lines = _rounds(run_dir)
        assert [line["round"] for line in lines] == [1, 2]
        assert not [d for line in lines for d in line["dropped"]], [line["dropped"] for line in lines]
        summary = json.loads((run_dir / "summary.json").read_text())
        assumptions = summary["privacy"]["assumptions"]
        assert (assumptions["hospitals"], assumptions["max_dropouts"], assumptions["max_colluding"]) == (3, 0, 0)
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            eps = [line["sites"][name]["epsilon"] for line in lines]
            assert 0 < eps[0] < eps[1] <= 4.0, eps
        from medfed.client.gate import read_audit
        from medfed.client.ledger import SKELLAM, site_ledgers

        for site in dep.sites:
            [ledger] = site_ledgers(site / "state")
            rounds = [e for e in ledger.entries() if e.mechanism == SKELLAM]
            assert [e.server_round for e in rounds] == [1, 2]
            assert {e.noise_multiplier for e in rounds} == {assumptions["noise_multiplier"]}
            sent = [e for e in read_audit(site / "state") if e["event"] == "sent" and e["type"] == "train"]
            assert len(sent) == 2 * 4, sent  # SecAgg+'s four stages per round
            for entry in sent:
                assert entry["error"] is None
                for rec in entry["records"].values():
                    # the mod empties the fit reply's weights; the masked integers travel as bytes in its configs
                    assert rec["kind"] in {"ConfigRecord", "MetricRecord", "ArrayRecord"}
                    if rec["kind"] == "ArrayRecord":
                        assert rec["elements"] == 0, rec
            masked = [e for e in sent if any("masked" in k for r in e["records"].values() for k in r.get("keys", []))]
            assert len(masked) == 2, sent


def test_tune_drives_real_runs_and_charges_each_dp_trial_to_the_hospitals_ledgers(tmp_path: Path) -> None:
    """`medfed tune --dir`: each trial is a real run on the coordinator's two hospitals; under DP the command says
    what the search costs and asks first; every trial is in each hospital's own ledger; no run reads the test
    split."""
    space = tmp_path / "space.yaml"
    space.write_text("privacy.max_grad_norm: {low: 0.5, high: 2.0}\n")
    with _deploy(tmp_path, [True, True]) as dep:
        out = tmp_path / "tune"
        args = ["tune", "--dir", str(dep.coord), *RECIPE, "train.rounds=1", "strategy.min_available_nodes=2",
                "privacy=dp", "privacy.target_epsilon=2", "privacy.exact_metrics=true", "--trials", "2", "--space",
                str(space), "--out", str(out)]

        # Execute: answered "n", it starts nothing; answered "y", the search runs
        refused = subprocess.run([MEDFED, *args], env=dep.env, input="n\n", capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0
        assert "each hospital's own privacy ledger" in refused.stderr and "up to 4 for the whole search" in \
            refused.stderr, refused.stderr
        assert _medfed(["runs", "list", "--dir", str(dep.coord), "--json"], dep.env).stdout.strip() == "[]"
        done = subprocess.run([MEDFED, *args], env=dep.env, input="y\n", capture_output=True, text=True, timeout=900)
        listed = json.loads(_medfed(["runs", "list", "--dir", str(dep.coord), "--json"], dep.env).stdout)

    # Assert: two real runs, both complete, none with a test metric; the recipe written
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in found["trials"]] == ["complete", "complete"], found["trials"]
    assert sorted(r["run-dir"] for r in listed) == sorted(t["run_dir"] for t in found["trials"])  # the coordinator's
    for trial in found["trials"]:
        run = Path(trial["run_dir"])
        assert run.parent == out.resolve()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["best"]["test"] is None and "uncertainty" not in summary
        assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
        assert "evaluate.test_split=false" in json.loads((run / "overrides.json").read_text())
    assert "privacy.max_grad_norm=" in (out / "best.yaml").read_text()
    # each hospital's own ledger holds both trials; the search reports what the hospitals reported
    from medfed.client.ledger import site_ledgers

    for site in dep.sites:
        [ledger] = site_ledgers(site / "state")
        assert len({e.run_id for e in ledger.entries() if e.kind == "train"}) == 2, ledger.entries()
    assert set(found["privacy_spent"]) == {"hospital-a", "hospital-b"}
    assert all(2.0 < eps <= 4.0 + 1e-9 for eps in found["privacy_spent"].values()), found["privacy_spent"]
    assert "privacy ledgers after the search" in done.stdout
