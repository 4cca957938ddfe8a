"""A deployment under load (issue 27): one coordinator and many hospital daemons on this machine, a run whose
hospitals are killed and restarted at random moments and whose coordinator is restarted once, and the checks that
nothing the coordinator recorded disagrees with what the hospitals' audit logs and privacy ledgers say.

Used by the e2e test (tests/e2e/test_load.py, a smaller plan that fits CI) and by benchmarks/load.py (the issue's
plan: 20 hospitals, 10 rounds). Everything is real: `medfed coordinator init/start` (SuperLink, TLS, SuperNode
authentication), `medfed hospital start` daemons (SuperNode, SuperExec, medfed's gate), `medfed train`. Each
hospital's data is one share of the synthetic task (what `medfed hospital export-demo` writes) and its site config
says ``threads: 1``; the site configs and keys are written in this process with the functions `medfed hospital
init` calls (20 CLI starts would cost a minute of the budget), and each key is registered through Flower's CLI.

Every process is started in a session of its own and stopped by PID: a hospital is killed with SIGKILL to every
process of its session (a crash: no clean-up), the coordinator is stopped with SIGTERM to its PID (an operator's
restart; or, with ``coordinator_crash``, SIGKILL to its whole session: a crash) and started again, and must resume the
run by itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Event", "Findings", "Happened", "LoadPlan", "LoadResult", "check", "cpu_breakdown", "describe",
           "rss_growth", "rss_mib", "run_load"]

logger = logging.getLogger(__name__)

MEDFED = str(Path(sys.executable).parent / "medfed")
SITE_NAME = "hospital-{:02d}"


@dataclass(frozen=True)
class LoadPlan:
    """What the scenario runs: the federation, the recipe's size, and the faults (drawn from ``seed``)."""

    hospitals: int = 20
    rounds: int = 10
    min_hospitals: int = 14  # strategy.min_train_nodes and min_available_nodes
    hospital_kills: int = 4
    coordinator_restarts: int = 1
    # how the coordinator goes down: False: SIGTERM to its PID (an operator's restart: it stops its SuperLink and
    # ServerApp); True: SIGKILL to every process of its session (a crash: no clean-up, the SuperLink's state.db as
    # it was mid-write)
    coordinator_crash: bool = False
    seed: int = 27
    # each phase of a round waits this long for replies: long enough for every live hospital's ClientApp to start
    # and train on a busy machine (20 of them share 2 cores: ~140 s measured). A hospital killed after it pulled
    # its message holds the round this long (Flower delivers a message once; a node that is back online within two
    # 30 s heartbeats never gets a "Node Unavailable" answer instead), so each such kill costs up to this much
    round_timeout_s: float = 240.0
    images: int = 40  # per hospital (train + validation), image_size^2 synthetic images
    image_size: int = 16
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # rounds train only (every evaluation is a ClientApp start per hospital)
    dp: bool = True  # DP-SGD at every hospital: each train reply is charged to the hospital's ledger
    target_epsilon: float = 4.0  # per run; each site's cap is medfed's default, 10
    kill_window_s: float = 90.0  # a kill comes this long at most after its round began
    downtime_s: tuple[float, float] = (1.0, 8.0)  # a killed hospital is started again after this long
    deadline_s: float = 3600.0  # from launch to summary.json

    def __post_init__(self) -> None:
        if not 1 <= self.min_hospitals <= self.hospitals:
            raise ValueError(f"min_hospitals={self.min_hospitals} must be in [1, hospitals={self.hospitals}]")
        if self.coordinator_restarts not in (0, 1):
            raise ValueError("coordinator_restarts must be 0 or 1")
        if self.coordinator_restarts and self.rounds < 3:
            raise ValueError("a coordinator restart needs rounds >= 3 (one checkpoint before it, one round after)")

    def overrides(self) -> list[str]:
        recipe = ["dataset=synthetic", f"dataset.image_size={self.image_size}",
                  f"dataset.n_train={self.images * self.hospitals}", "dataset.n_test=64",
                  f"federation.hospitals={self.hospitals}", "model=smallcnn", "model.width=4",
                  f"train.rounds={self.rounds}", "train.local_epochs=1", "train.batch_size=16",
                  f"strategy.min_train_nodes={self.min_hospitals}",
                  f"strategy.min_available_nodes={self.min_hospitals}",
                  f"strategy.min_evaluate_nodes={self.min_hospitals}",
                  f"strategy.fraction_train={self.fraction_train}",
                  f"strategy.fraction_evaluate={self.fraction_evaluate}",
                  f"strategy.round_timeout_s={self.round_timeout_s}", "evaluate.calibrate=false"]
        if self.dp:
            recipe += ["privacy=dp", f"privacy.target_epsilon={self.target_epsilon}", "privacy.exact_metrics=true"]
        return recipe

    def schedule(self) -> list[Event]:
        """The faults, drawn from ``seed``: each comes ``delay_s`` after round ``round`` began (its previous
        round's line in metrics.jsonl; round 1: the launch). The victims are distinct while there are hospitals
        left; at run time a kill waits while as many hospitals are down as the rounds' minimum leaves room for."""
        rng = random.Random(self.seed)
        events: list[Event] = []
        if self.coordinator_restarts:  # mid-run: each coordinator life then records 3 rounds or more (its memory)
            low, high = (4, self.rounds - 2) if self.rounds >= 6 else (2, self.rounds - 1)
            at = rng.randint(low, high)
            events.append(Event(at, rng.uniform(0.0, self.kill_window_s), "coordinator"))
        # stratified: the k-th kill in the k-th of equal stretches of the run's rounds (spread, not clustered)
        kills = self.hospital_kills
        rounds = [rng.randint(1 + k * self.rounds // kills, max(1 + k * self.rounds // kills,
                                                                 (k + 1) * self.rounds // kills))
                  for k in range(kills)]
        victims: list[int] = []
        while len(victims) < len(rounds):
            victims += rng.sample(range(self.hospitals), self.hospitals)
        for at, victim in zip(rounds, victims, strict=False):
            events.append(Event(at, rng.uniform(0.0, self.kill_window_s), "hospital", victim,
                                rng.uniform(*self.downtime_s)))
        return sorted(events, key=lambda e: (e.round, e.delay_s))


@dataclass(frozen=True)
class Event:
    """A planned fault: ``kind`` hospital (``victim``, started again after ``downtime_s``) or coordinator."""

    round: int
    delay_s: float
    kind: str
    victim: int | None = None
    downtime_s: float = 0.0


@dataclass
class Happened:
    """A fault as it happened: when (seconds since launch), during which round (rounds done + 1), to whom."""

    kind: str
    at_s: float
    round: int
    victim: str | None = None
    wall: float = 0.0  # time.time() of the kill (audit and ledger entries carry wall-clock times)
    restarted_at_s: float | None = None
    restarted_wall: float | None = None


@dataclass
class LoadResult:
    """What a load run produced and measured."""

    plan: LoadPlan
    root: Path
    coord: Path
    run_dir: Path
    sites: dict[str, Path]
    events: list[Happened] = field(default_factory=list)
    setup_s: float = 0.0
    run_s: float = 0.0
    round_end_s: dict[int, float] = field(default_factory=dict)  # round -> seconds since launch its line appeared
    # per round (and coordinator life): the SuperLink's and the ServerApp's peak RSS in MiB while the round ran
    rss: list[dict[str, Any]] = field(default_factory=list)
    coordinator_down_s: float = 0.0  # from its stop until the resumed run was launched
    coordinator_steps_s: dict[str, float] = field(default_factory=dict)  # stop, start (SuperLink ready), resume
    died: list[str] = field(default_factory=list)  # daemons that exited by themselves (never killed by us)
    cpu_setup: dict[str, float] = field(default_factory=dict)  # CPU seconds by role (cpu_breakdown) at launch
    cpu: dict[str, float] = field(default_factory=dict)  # ... at the end, killed and stopped processes included
    messages: int = 0  # ClientApp processes started (train and evaluate replies the hospitals audited)
    timed_out: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _medfed(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run([MEDFED, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"medfed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def rss_mib(pid: int) -> float | None:
    """A process's resident memory in MiB (VmRSS), None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...); [] once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return []


def _session(sid: int) -> list[int]:
    """The PIDs of the processes in session ``sid`` (one this module started with ``start_new_session``, whose
    leader's PID is ``sid``; its members may have outlived the leader), read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if len(fields) > 3 and int(fields[3]) == sid:
                members.append(int(entry.name))
    return members


class _Processes:
    """Every process the scenario started, each in a session of its own; stopped by PID."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.all: list[subprocess.Popen[bytes]] = []
        self.logs = 0
        self.last_log = root

    def spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        self.logs += 1
        log = self.root / "logs" / f"{name}-{self.logs}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as out:  # (the child holds its own copy of the descriptor)
            process = subprocess.Popen([MEDFED, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.all.append(process)
        self.last_log = log
        return process

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and every process of the session it leads (a crash), each by its PID."""
        for pid in _session(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)

    @classmethod
    def stop(cls, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """SIGTERM the process (it stops what it started by PID), SIGKILL its session after ``timeout``."""
        if process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        cls.kill(process)  # anything of its session still running

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process still running at once (each stops what it started by PID), give them ``grace_s``
        together, then SIGKILL each one's session (a SuperLink waits up to 15 s for its hospitals' connections to
        close: nothing here needs that)."""
        for process in self.all:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.all):
            time.sleep(0.1)
        for process in reversed(self.all):
            self.kill(process)


def _write_sites(root: Path, plan: LoadPlan, address: str, ca: Path) -> dict[str, Path]:
    """Every hospital's data (its share of the synthetic task, as `hospital export-demo` writes it), site config
    (``threads: 1``, this installation's bundle approved) and SuperNode key pair, as `hospital init` writes them."""
    from medfed.cli.bundle import bundle_hash
    from medfed.client.site import SiteConfig, write_site_config
    from medfed.common.config import compose_config
    from medfed.common.data import ArrayDataset, load_site
    from medfed.common.data.site_files import write_array_file
    from medfed.common.pki import create_node_keys

    cfg = compose_config(plan.overrides())
    approved = bundle_hash()
    sites = {}
    for index in range(plan.hospitals):
        name = SITE_NAME.format(index)
        folder = root / name
        data = root / "data" / f"{name}.npz"
        share = load_site(cfg, index)
        write_array_file(data, ArrayDataset.concat([share.train, share.val]))
        create_node_keys(folder)
        site = SiteConfig(site_id=name, data_path=str(data), n_classes=2, secure_rng=False, superlink=address,
                          ca_certificate=str(ca), auth_key="node.key", runtime_port=_free_port(),
                          approved_apps=[approved], threads=1, require_dp=False, source=(folder / "site.yaml").resolve())
        write_site_config(site, folder / "site.yaml")
        sites[name] = folder
    return sites


def _pid_file(site: Path) -> Path:
    from medfed.client.daemon import PID_FILE

    return site / "state" / PID_FILE


def _wait_started(daemons: dict[str, subprocess.Popen[bytes]], sites: dict[str, Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(daemons)
    while pending:
        for name, process in list(pending.items()):
            pid_file = _pid_file(sites[name])
            if pid_file.is_file() and pid_file.read_text().strip() == str(process.pid):
                del pending[name]
            elif process.poll() is not None:
                raise RuntimeError(f"{name}: `hospital start` exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"hospital daemons never started: {sorted(pending)}")
        time.sleep(0.2)


def _wait_online(coordinator: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        online = sum(1 for n in coordinator.nodes() if n.get("status") == "online")
        if online >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{online} of {count} hospitals online after {timeout:.0f} s")
        time.sleep(1)


def _cpu_s(pid: int) -> tuple[float, float]:
    """A process's own CPU seconds (user + system) and those of its children it has waited for."""
    fields = _stat(pid)
    if len(fields) < 15:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _parent_role(pid: int) -> str:
    """The role of a process that has exited and awaits its parent's wait (its command line reads empty): what
    its parent starts (a SuperExec's ClientApp or ServerApp)."""
    fields = _stat(pid)
    if len(fields) < 2:
        return ""
    command = _cmdline(int(fields[1]))
    return "flwr-serverapp" if "flower-superexec" in command else "clientapp" if "superexec" in command else ""


def _is_superlink(command: str) -> bool:
    return "flower-superlink" in command or "medfed.server.superlink" in command


def cpu_breakdown(pids: list[int]) -> dict[str, float]:
    """CPU seconds spent so far below ``pids`` (each a `medfed` daemon), by role: the `medfed` processes
    themselves, Flower's SuperLink / SuperNode, the SuperExecs, and the app processes they started (ServerApp,
    ClientApps: counted once their SuperExec has waited for them, plus those still running)."""
    from medfed.common.processes import descendants

    out: dict[str, float] = {}

    def add(role: str, seconds: float) -> None:
        out[role] = out.get(role, 0.0) + seconds

    for pid in pids:
        own, _ = _cpu_s(pid)
        add("medfed daemons", own)
        for child in descendants(pid):
            command = _cmdline(child) or _parent_role(child)
            own, waited = _cpu_s(child)
            if _is_superlink(command):
                add("superlink", own)
                add("serverapp", waited)  # its SuperExec's ServerApps (the SuperLink waits for its SuperExec)
            elif "flower-supernode" in command:
                add("supernodes", own)
            elif "superexec" in command:
                add("superexecs", own)
                add("clientapps", waited)
            elif "clientapp" in command:
                add("clientapps", own)
            elif "serverapp" in command:
                add("serverapp", own)
            else:
                add("other", own)
    return out


def _coordinator_tree(pid: int) -> dict[str, int]:
    """The SuperLink's and the ServerApp's PIDs below a `medfed coordinator start` (PID ``pid``)."""
    from medfed.common.processes import descendants

    found: dict[str, int] = {}
    for child in descendants(pid):
        command = _cmdline(child)
        if _is_superlink(command):
            found.setdefault("superlink", child)
        elif "flwr-serverapp" in command:
            found["serverapp"] = child  # the newest: a resumed run's
    return found


def _lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def run_load(root: Path, plan: LoadPlan, progress: Callable[[str], None] = lambda line: None) -> LoadResult:
    """Run the scenario in ``root`` (a fresh folder); every process it started is stopped before it returns."""
    root.mkdir(parents=True, exist_ok=True)
    procs = _Processes(root, _env(root))
    try:
        return _Run(root, plan, procs, progress).run()
    finally:
        procs.stop_all()


class _Run:
    """One load run: set-up, launch, then a loop that records rounds and memory and injects the faults."""

    def __init__(self, root: Path, plan: LoadPlan, procs: _Processes, progress: Callable[[str], None]) -> None:
        from medfed.server.coordinator import Coordinator

        self.plan, self.procs, self.progress = plan, procs, progress
        address = f"127.0.0.1:{_free_port()}"
        self.result = LoadResult(plan, root, root / "coord", root / "run", {})
        self.coordinator = Coordinator(self.result.coord, address=address)
        self.coordinator_process: subprocess.Popen[bytes] | None = None
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}  # each daemon's current log
        self.down: dict[str, Happened] = {}  # killed hospitals not back online yet
        self.restarts: list[tuple[float, Happened]] = []  # (when, what): killed hospitals to start again
        self.gone: dict[str, float] = {}  # CPU seconds of processes killed or stopped, by role
        self.started = time.monotonic()
        self.launched = 0.0
        self.life = 0  # coordinator starts so far - 1
        self.tree: dict[str, int] = {}  # the coordinator's SuperLink and ServerApp PIDs
        self.tree_at = 0.0
        self.peak: dict[str, float] = {}  # their peak RSS (MiB) in the round running now

    def _since(self) -> float:
        return time.monotonic() - self.launched

    def _account(self, pids: list[int]) -> None:
        for role, seconds in cpu_breakdown(pids).items():
            self.gone[role] = self.gone.get(role, 0.0) + seconds

    def _start_hospital(self, name: str) -> None:
        site = self.result.sites[name]
        self.daemons[name] = self.procs.spawn(["hospital", "start", "--config", str(site / "site.yaml")], name)
        self.logs[name] = self.procs.last_log

    def _back(self, name: str) -> bool:
        """Whether a hospital started again has been let in by the SuperLink (Flower logs its node id then)."""
        try:
            return "SuperNode ID:" in self.logs[name].read_text(errors="replace")
        except OSError:
            return False

    def _start_coordinator(self) -> None:
        self.coordinator_process = self.procs.spawn(["coordinator", "start", "--dir", str(self.result.coord)],
                                                    "coordinator")
        self.coordinator.wait_ready(self.coordinator_process, timeout=120)

    def setup(self) -> None:
        plan, result, env = self.plan, self.result, self.procs.env
        _medfed(["coordinator", "init", "--dir", str(result.coord), "--host", "127.0.0.1", "--address",
                 self.coordinator.address], env)
        self.coordinator_process = self.procs.spawn(["coordinator", "start", "--dir", str(result.coord)],
                                                    "coordinator")
        result.sites = _write_sites(result.root, plan, self.coordinator.address, result.coord / "ca.crt")
        self.coordinator.wait_ready(self.coordinator_process, timeout=120)
        for name, site in result.sites.items():
            self.coordinator.register(site / "node.pub", name=name)
        for name in result.sites:
            self._start_hospital(name)
        _wait_started(self.daemons, result.sites, timeout=300)
        _wait_online(self.coordinator, plan.hospitals, timeout=300)
        result.setup_s = time.monotonic() - self.started
        result.cpu_setup = cpu_breakdown(self._pids())
        self.progress(f"set up {plan.hospitals} hospitals in {result.setup_s:.1f} s")

    def _pids(self) -> list[int]:
        assert self.coordinator_process is not None
        return [self.coordinator_process.pid, *(d.pid for d in self.daemons.values() if d.poll() is None)]

    def _watch_memory(self, lines: int) -> None:
        """Read the SuperLink's and the ServerApp's RSS (their PIDs looked up again every 2 s: a run's ServerApp
        starts after its launch) and keep each one's peak of the round running now: round ``lines`` + 1, unless a
        line appeared meanwhile (then the reading may be of what comes after the round, e.g. the final stages after
        the last one, and is not kept)."""
        assert self.coordinator_process is not None
        if time.monotonic() - self.tree_at > 2.0:
            self.tree, self.tree_at = _coordinator_tree(self.coordinator_process.pid), time.monotonic()
        readings = {role: rss_mib(pid) for role, pid in self.tree.items()}
        if _lines(self.result.run_dir) != lines:
            return
        for role, value in readings.items():
            if value is not None:
                self.peak[role] = max(self.peak.get(role, 0.0), value)

    def _round_done(self, server_round: int) -> None:
        self.result.rss.append({"round": server_round, "life": self.life, "at_s": self._since(), **self.peak})
        self.peak = {}

    def run(self) -> LoadResult:
        plan, result = self.plan, self.result
        self.setup()
        _medfed(["train", "--dir", str(result.coord), "--run-dir", str(result.run_dir), *plan.overrides()],
                self.procs.env)
        self.launched = time.monotonic()
        schedule = plan.schedule()
        began = {1: self.launched}  # round -> when it began (its previous round's line appeared)
        seen = 0  # lines of metrics.jsonl seen
        while not (result.run_dir / "summary.json").exists():
            if self._since() > plan.deadline_s:
                result.timed_out = True
                break
            lines = _lines(result.run_dir)
            self._watch_memory(lines)
            if lines != seen:  # a round ended (or a resumed run dropped the lines after its checkpoint)
                for done in range(seen + 1, lines + 1):
                    result.round_end_s[done] = self._since()
                    began[done + 1] = time.monotonic()
                    self._round_done(done)
                seen = lines
                self.progress(f"round {lines} at {self._since():.1f} s (peak RSS MiB {result.rss[-1]})")
            due = [e for e in schedule if e.round in began and time.monotonic() >= began[e.round] + e.delay_s]
            for event in due:
                if event.kind == "coordinator":
                    schedule.remove(event)
                    seen = self._restart_coordinator(lines)
                    began[seen + 1] = time.monotonic()  # the resumed run's first round begins
                    break
                if self._kill_hospital(event, lines):  # (a kill waits while too many hospitals are down)
                    schedule.remove(event)
            self._restart_due()
            time.sleep(0.2)
        result.run_s = self._since()
        self._account(self._pids())
        result.cpu = self.gone
        result.messages = sum(1 for site in result.sites.values() for e in _audit(site) if e.get("event") == "sent")
        return result

    def _restart_coordinator(self, lines: int) -> int:
        """Stop the coordinator by its PID (SIGTERM: it stops its SuperLink and ServerApp) or crash it (SIGKILL to its
        session, ``plan.coordinator_crash``), start it again and wait until it has resumed the run by itself;
        returns the lines metrics.jsonl has then."""
        assert self.coordinator_process is not None
        happened = Happened("coordinator", self._since(), lines + 1, wall=time.time())
        stopped = time.monotonic()
        self._account([self.coordinator_process.pid])
        if self.result.plan.coordinator_crash:
            self.procs.kill(self.coordinator_process)
        else:
            self.procs.stop(self.coordinator_process)
        steps = {"stop": time.monotonic() - stopped}
        self._start_coordinator()
        steps["start"] = time.monotonic() - stopped - steps["stop"]
        while not any("auto-resumed-at" in e for e in self.coordinator.runs().values()):
            if self.coordinator_process is None or self.coordinator_process.poll() is not None or \
                    time.monotonic() - stopped > 180:
                raise RuntimeError("the restarted coordinator did not resume the run")
            time.sleep(0.2)
        self.life += 1
        self.tree, self.tree_at, self.peak = {}, 0.0, {}
        self.result.coordinator_down_s = time.monotonic() - stopped
        steps["resume"] = self.result.coordinator_down_s - steps["stop"] - steps["start"]
        self.result.coordinator_steps_s = steps
        happened.restarted_at_s, happened.restarted_wall = self._since(), time.time()
        self.result.events.append(happened)
        self.progress(f"coordinator stopped during round {lines + 1}; resumed after "
                      f"{self.result.coordinator_down_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in steps.items())})")
        return _lines(self.result.run_dir)

    def _kill_hospital(self, event: Event, lines: int) -> bool:
        """SIGKILL a hospital's daemon and everything it started; False (the kill waits) while as many hospitals
        as the rounds' minimum leaves room for are still down (killed, or started again and not yet let in: the
        SuperLink refuses a node it still lists online, up to two 30 s heartbeats after the kill)."""
        for name in [n for n, h in self.down.items() if h.restarted_at_s is not None and self._back(n)]:
            del self.down[name]
        if len(self.down) >= self.plan.hospitals - self.plan.min_hospitals:
            return False
        assert event.victim is not None
        victim = SITE_NAME.format(event.victim)
        if victim in self.down:  # still down: the next one up
            victim = next(SITE_NAME.format((event.victim + k) % self.plan.hospitals)
                          for k in range(1, self.plan.hospitals)
                          if SITE_NAME.format((event.victim + k) % self.plan.hospitals) not in self.down)
        happened = Happened("hospital", self._since(), lines + 1, victim, wall=time.time())
        self._account([self.daemons[victim].pid])
        self.procs.kill(self.daemons[victim])
        self.down[victim] = happened
        self.restarts.append((time.monotonic() + event.downtime_s, happened))
        self.result.events.append(happened)
        self.progress(f"killed {victim} during round {lines + 1} at {happened.at_s:.1f} s")
        return True

    def _restart_due(self) -> None:
        for item in [r for r in self.restarts if time.monotonic() >= r[0]]:
            _, happened = item
            assert happened.victim is not None
            self._start_hospital(happened.victim)
            happened.restarted_at_s, happened.restarted_wall = self._since(), time.time()
            self.restarts.remove(item)
        pending = {h.victim for _, h in self.restarts}
        for name, process in self.daemons.items():
            if process.poll() is not None and name not in pending and name not in self.result.died:
                self.result.died.append(name)


def _audit(site: Path) -> list[dict[str, Any]]:
    from medfed.client.gate import read_audit

    return read_audit(site / "state")


# --- checks -------------------------------------------------------------------------------------------------------
@dataclass
class Findings:
    """What the checks found: ``problems`` must be empty; the rest says how the faults showed."""

    problems: list[str] = field(default_factory=list)
    trained_per_round: dict[int, int] = field(default_factory=dict)
    replies_recorded: int = 0  # audited train replies the coordinator recorded (site, round)
    replies_dropped: int = 0  # audited, then named in the round's dropped list (late, or lost in a kill)
    replies_superseded: int = 0  # audited for a round the coordinator restart cut off (run again after it)
    charged_unsent: int = 0  # ledger releases never sent: the hospital was killed between charge and reply


def _run_ids(result: LoadResult) -> tuple[list[int], int | None]:
    """This run's Flower run ids (oldest first) and the rounds the first had done when it was resumed."""
    index = json.loads((result.coord / "runs.json").read_text())
    # in launch order (Flower's run ids are random numbers, not a sequence)
    mine = sorted(((int(k), v) for k, v in index.items() if Path(v.get("run-dir", "")) == result.run_dir.resolve()),
                  key=lambda item: float(item[1].get("t0", 0.0)))
    resumed_at = next((int(v["auto-resumed-at"]) for _, v in mine if "auto-resumed-at" in v), None)
    return [k for k, _ in mine], resumed_at


def check(result: LoadResult) -> Findings:
    """Every round recorded once with at least its minimum of hospitals; each hospital's audit log and ledger
    agree with what the coordinator recorded; the run's outputs are all there."""
    from medfed.client.gate import read_audit
    from medfed.client.ledger import site_ledgers
    from medfed.client.privacy import epsilon_spent

    plan, found = result.plan, Findings()
    problems = found.problems
    if result.timed_out:
        problems.append(f"the run did not finish within {plan.deadline_s:.0f} s")
    if result.died:
        problems.append(f"daemons exited by themselves: {result.died}")
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (result.run_dir / "metrics.jsonl").is_file() else []
    if [line["round"] for line in lines] != list(range(1, plan.rounds + 1)):
        problems.append(f"metrics.jsonl rounds {[line['round'] for line in lines]}, not 1..{plan.rounds}")
    for line in lines:
        trained = sorted(s for s, v in line["sites"].items() if v.get("trained"))
        found.trained_per_round[line["round"]] = len(trained)
        if len(trained) < plan.min_hospitals:
            problems.append(f"round {line['round']}: {len(trained)} hospitals trained, minimum {plan.min_hospitals}")
    summary_path = result.run_dir / "summary.json"
    if not summary_path.is_file():
        problems.append("summary.json was not written")
    elif json.loads(summary_path.read_text()).get("rounds") != plan.rounds:
        problems.append(f"summary.json: rounds {json.loads(summary_path.read_text()).get('rounds')}")
    for name in ("model.pt", "best_model.pt", "checkpoints"):
        if not (result.run_dir / name).exists():
            problems.append(f"{name} is missing from the run directory")
    run_ids, resumed_at = _run_ids(result)
    coordinator_restarts = sum(1 for e in result.events if e.kind == "coordinator")
    if len(run_ids) != 1 + coordinator_restarts:
        problems.append(f"run ids {run_ids} for {coordinator_restarts} coordinator restart(s)")
    if not run_ids:
        return found

    def recording_run(server_round: int) -> int:
        """The Flower run that recorded a round: the first up to its checkpoint at the restart, then the resumed."""
        return run_ids[0] if resumed_at is None or server_round <= resumed_at else run_ids[-1]

    by_round = {line["round"]: line for line in lines}
    for name, site in result.sites.items():
        audit = [e for e in read_audit(site / "state") if e.get("event") == "sent" and e.get("run") in run_ids]
        sent = [e for e in audit if e["type"] == "train" and e["error"] is None]
        for e in audit:
            if e["error"] is not None:  # no fault here gives a hospital a reason to refuse or fail
                problems.append(f"{name} round {e['round']}: replied with an error: {e['error'][:300]}")
        kills = [e for e in result.events if e.victim == name]
        # 1. each round the coordinator recorded this hospital as trained: the reply it audited, with the same
        #    numbers, sent in the run that recorded the round
        for r, line in by_round.items():
            recorded = line["sites"].get(name)
            if not recorded or not recorded.get("trained"):
                continue
            matches = [e for e in sent if e["round"] == r and e["run"] == recording_run(r)]
            if len(matches) != 1:
                problems.append(f"{name} round {r}: recorded as trained, {len(matches)} audited replies in run "
                                f"{recording_run(r)}")
                continue
            values = matches[0]["values"]
            for key, field_name in (("train-time-s", "train_s"), ("train-loss", "train_loss"),
                                    ("n-train", "n_train"), ("epsilon", "epsilon")):
                if key in values and not math.isclose(float(values[key]), float(recorded[field_name]), rel_tol=1e-9):
                    problems.append(f"{name} round {r}: the coordinator recorded {field_name}={recorded[field_name]}, "
                                    f"the audited reply says {values[key]}")
            found.replies_recorded += 1
        # 2. each train reply it audited and the coordinator did not record: cut off by the coordinator restart,
        #    or named in that round's dropped list (a reply too late, or lost when the hospital was killed)
        for e in sent:
            r = e["round"]
            line = by_round.get(r, {})
            if e["run"] == recording_run(r) and line.get("sites", {}).get(name, {}).get("trained"):
                continue
            if e["run"] != recording_run(r):
                if e["run"] == run_ids[0] and resumed_at is not None and r > resumed_at:
                    found.replies_superseded += 1
                else:
                    problems.append(f"{name}: audited train reply of run {e['run']} round {r} that no run recorded")
                continue
            if any(d["site"] == name and d["phase"] == "train" for d in line.get("dropped", [])):
                found.replies_dropped += 1
            else:
                problems.append(f"{name} round {r}: audited train reply neither recorded nor dropped")
        # 3. its ledger: every release it charged was sent (or it was killed before it could send), and every
        #    epsilon it reported is the ledger's composition at the time
        if not plan.dp:
            continue
        entries = sorted((e for ledger in site_ledgers(site / "state") for e in ledger.entries()),
                         key=lambda e: e.recorded_at)
        charged = {(e.run_id, e.server_round) for e in entries if e.run_id in run_ids}
        answered = {(e["run"], e["round"]) for e in audit if e["type"] == "train"}
        for run, r in sorted(charged - answered):
            when = min(x.recorded_at for x in entries if (x.run_id, x.server_round) == (run, r))
            after = min((e["time"] for e in audit if e["time"] >= when), default=math.inf)  # its next reply
            killed = any(when <= k.wall <= after for k in kills) or (  # killed before it could reply
                run == run_ids[0] and resumed_at is not None and r > resumed_at)  # cut off by the restart
            if killed:
                found.charged_unsent += 1
            else:
                problems.append(f"{name}: ledger charged run {run} round {r}, and no reply was sent")
        for run, r in sorted(answered - charged):
            problems.append(f"{name}: sent a train reply of run {run} round {r} its ledger never charged")
        prefixes = [epsilon_spent(entries[: i + 1], 1e-5) for i in range(len(entries))]
        for e in sent:
            if e["epsilon"] is not None and not any(math.isclose(e["epsilon"], p, rel_tol=1e-9) for p in prefixes):
                problems.append(f"{name} round {e['round']}: reported epsilon {e['epsilon']} is no state of its ledger")
        if prefixes and prefixes[-1] > 10.0 + 1e-9:
            problems.append(f"{name}: ledger epsilon {prefixes[-1]} is past the site's cap 10")
    return found


def rss_growth(result: LoadResult) -> dict[str, dict[str, float]]:
    """The coordinator's memory across rounds, in MiB: for the SuperLink and the ServerApp of each coordinator
    life with three or more rounds, the peak RSS of its second round (``early``: after the first round's start-up)
    and of its last (``late``); and ``<process>-run``: the first life's early against the last life's late (a
    restarted coordinator must not start where a leak left off: its state comes from state.db and the checkpoint)."""
    out: dict[str, dict[str, float]] = {}
    lives: dict[int, list[dict[str, Any]]] = {}
    for sample in result.rss:
        lives.setdefault(sample["life"], []).append(sample)
    for proc in ("superlink", "serverapp"):
        ends = []
        for life, samples in sorted(lives.items()):
            values = [(s["round"], s[proc]) for s in samples if s.get(proc)]
            if len(values) >= 3:
                (r0, early), (r1, late) = values[1], values[-1]
                out[f"{proc}-{life}"] = {"early_round": r0, "early": early, "late_round": r1, "late": late,
                                         "growth": late - early}
                ends.append(out[f"{proc}-{life}"])
        if len(ends) >= 2:
            out[f"{proc}-run"] = {"early_round": ends[0]["early_round"], "early": ends[0]["early"],
                                  "late_round": ends[-1]["late_round"], "late": ends[-1]["late"],
                                  "growth": ends[-1]["late"] - ends[0]["early"]}
    return out


def describe(result: LoadResult) -> str:
    """One line per fault, for a failure message or a log."""
    return "\n".join(f"  {e.kind} {e.victim or ''} at {e.at_s:.1f} s in round {e.round}"
                     f"{'' if e.restarted_at_s is None else f', back at {e.restarted_at_s:.1f} s'}"
                     for e in result.events)
