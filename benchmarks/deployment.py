"""Benchmark: per-round wall time of a real 2-hospital deployment vs the same run in simulation, and where the
difference goes.

The same recipe both ways: the synthetic task, 2 hospitals (each deployed hospital holds exactly the share the
simulation gives it, written by `medfed hospital export-demo`), FedAvg, ROUNDS rounds. The deployment is real:
`medfed coordinator start` (SuperLink, TLS, SuperNode authentication) and two `medfed hospital start` daemons on
127.0.0.1, the run launched with `medfed train`. Per-round wall time is the difference of consecutive rounds'
`elapsed_s` in metrics.jsonl (round 1 also holds the run's start-up and is reported apart).

Where a deployed round's time goes, per round: the hospitals' compute (the slower hospital's train + evaluate
seconds, as they run in parallel, plus the coordinator's test evaluation) from metrics.jsonl; the start-up of the
ClientApp process Flower launches for every message (2 per round), measured here by starting that process's
imports in a fresh interpreter; Flower's SuperNode polling (one message every 3 s at most: on average 1.5 s of
waiting per message); the rest (HTTPS round trips, SuperExec and ServerApp polling, serialisation).

    python benchmarks/deployment.py           # ~3 min on 2 cores
    python benchmarks/deployment.py --quick   # 2 rounds: checks the script, not the figures

Writes the results into docs/benchmarks.md (between the `deployment` markers) and benchmarks/results/deployment.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import run_medfed, write_doc  # noqa: E402  (benchmarks/ is the script's folder)

logger = logging.getLogger("benchmarks.deployment")

START, END = "<!-- deployment:start -->", "<!-- deployment:end -->"
ROUNDS = 8
RECIPE = ["dataset=synthetic", "federation.hospitals=2", "strategy.min_available_nodes=2",
          # one epoch a round: the recipe the documented figures were measured with (the
          # default counts steps since issue 26)
          "train.local_epochs=1"]
# the two deployed hospitals share this machine's cores, one thread each (`hospital init --threads`); the
# simulation trains them one after the other on every core (its default)
SITE_THREADS = 1
POLL_S = 3.0  # Flower's SuperNode asks the SuperLink for a message every 3 s when idle
# what every `medfed-clientapp` process imports before it can pull its message: medfed's gate and app, Flower's
# ClientApp runtime
CLIENTAPP_IMPORTS = ("import medfed.client.gate, medfed.client.app, medfed.client.site, "
                     "flwr.supernode.cli.flwr_clientapp, flwr.supernode.runtime.run_clientapp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _medfed(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "medfed"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"medfed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(Path(sys.executable).parent / "medfed"), *args], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_deployment(work: Path, recipe: list[str], hospitals: int = 2) -> tuple[Path, float]:
    """A coordinator and ``hospitals`` hospitals on 127.0.0.1 (site folders ``work/site-I``, each with its state
    directory and audit log); returns the run directory and `medfed train --wait` seconds."""
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    coord, address = work / "coord", f"127.0.0.1:{_free_port()}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        _medfed(["coordinator", "init", "--dir", str(coord), "--host", "127.0.0.1", "--address", address], env)
        processes.append(_spawn(["coordinator", "start", "--dir", str(coord)], env, work / "coordinator.log"))
        for index in range(hospitals):
            site, data = work / f"site-{index}", work / f"data-{index}.npz"
            _medfed(["hospital", "export-demo", "--index", str(index), "--out", str(data), *recipe], env)
            _medfed(["hospital", "init", "--dir", str(site), "--site-id", f"hospital-{index}", "--data-path", str(data),
                     "--n-classes", "2", "--superlink", address, "--ca", str(coord / "ca.crt"), "--runtime-port",
                     str(_free_port()), "--threads", str(SITE_THREADS), "--approve-installed", "--no-require-dp"], env)
            _medfed(["hospitals", "register", str(site / "node.pub"), "--dir", str(coord)], env)
            processes.append(_spawn(["hospital", "start", "--config", str(site / "site.yaml")], env,
                                    work / f"site-{index}.log"))
        run_dir = work / "run"
        started = time.perf_counter()
        _medfed(["train", "--dir", str(coord), "--run-dir", str(run_dir), "--wait", *recipe], env, timeout=1800)
        return run_dir, time.perf_counter() - started
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def clientapp_startup_s(repeats: int = 5) -> float:
    """Median seconds for a fresh interpreter to import what a `medfed-clientapp` process imports."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", CLIENTAPP_IMPORTS], check=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_round(run_dir: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [line["elapsed_s"] for line in lines]
    walls = [b - a for a, b in zip(elapsed, elapsed[1:])]
    compute = []
    for line in lines[1:]:
        sites = line["sites"].values()
        server = line["round_compute_s"] - sum(s["train_s"] + s["eval_s"] for s in sites)
        compute.append(max(s["train_s"] for s in sites) + max(s["eval_s"] for s in sites) + server)
    return {"first_round_s": elapsed[0], "round_s": statistics.mean(walls), "round_s_each": walls,
            "critical_compute_s": statistics.mean(compute), "rounds": len(lines),
            "test_auc_final": lines[-1]["test"]["auc"]}


def render(sim: dict[str, Any], dep: dict[str, Any], startup: float, total_s: float, command: str) -> str:
    overhead = dep["round_s"] - dep["critical_compute_s"]
    polling = 2 * (POLL_S / 2)  # two messages, each waiting half a poll interval on average
    rest = overhead - 2 * startup - polling
    lines = [
        START,
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, 2 cores, no GPU; whole script "
        f"{total_s / 60:.1f} min. Reproduce with:",
        "",
        f"    {command}",
        "",
        f"Synthetic task, 2 hospitals, FedAvg, {sim['rounds']} rounds, the same recipe and data both ways "
        "(`" + " ".join(RECIPE) + "`). Per-round wall time is the mean over rounds 2.." + f"{sim['rounds']}; round 1 "
        "also holds the run's start-up. The simulation trains the hospitals one after the other on both cores; the "
        f"deployed hospitals train at the same time, {SITE_THREADS} thread each (`medfed hospital init --threads "
        f"{SITE_THREADS}`: two sites on one 2-core machine).",
        "",
        "| | round 1 s (with start-up) | per-round wall s | compute on the critical path s | final test AUC |",
        "|---|---|---|---|---|",
        f"| simulation (`medfed simulate`) | {sim['first_round_s']:.2f} | {sim['round_s']:.2f} | "
        f"{sim['critical_compute_s']:.2f} | {sim['test_auc_final']:.4f} |",
        f"| deployment (TLS, node auth, 127.0.0.1) | {dep['first_round_s']:.2f} | {dep['round_s']:.2f} | "
        f"{dep['critical_compute_s']:.2f} | {dep['test_auc_final']:.4f} |",
        "",
        f"Where a deployed round's {dep['round_s']:.2f} s go (per round: a train and an evaluate message per hospital, "
        "the two hospitals in parallel):",
        "",
        "| part | s per round | how it was measured |",
        "|---|---|---|",
        f"| compute (slower hospital's train + evaluate, coordinator's test evaluation) | {dep['critical_compute_s']:.2f} "
        "| metrics.jsonl |",
        f"| ClientApp process start-up, 2 messages x {startup:.2f} s | {2 * startup:.2f} | a fresh interpreter "
        "importing medfed's gate and app and Flower's ClientApp runtime, median of 5 |",
        f"| SuperNode polling, 2 messages x {POLL_S / 2:.1f} s on average | {polling:.2f} | Flower's 3 s poll interval "
        "(expected value) |",
        f"| the rest: HTTPS round trips, SuperExec (0.2 s) and ServerApp (0.2 s) polling, serialisation, FAB check "
        f"| {rest:.2f} | remainder |",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds: checks the script, not the figures")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = [*RECIPE, f"train.rounds={2 if args.quick else ROUNDS}"]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-deploy-") as tmp:
        work = Path(tmp)
        code, wall, out = run_medfed(["simulate", "--run-dir", str(work / "sim"), *recipe], cwd=REPO, timeout=1800)
        if code != 0:
            raise SystemExit(f"simulation failed (exit {code}):\n{out[-4000:]}")
        sim = per_round(work / "sim")
        logger.info("simulation: %s", sim)
        run_dir, dep_wall = run_deployment(work / "deployment", recipe)
        dep = per_round(run_dir)
        logger.info("deployment: %s (train --wait %.1f s)", dep, dep_wall)
    startup = clientapp_startup_s()
    logger.info("ClientApp start-up: %.2f s", startup)
    command = "python benchmarks/deployment.py" + (" --quick" if args.quick else "")
    section = render(sim, dep, startup, time.time() - started, command)
    print(section)
    if not args.quick:
        heading = "Deployment vs simulation: per-round wall time"
        write_doc(section, args.doc, start=START, end=END, heading=heading)
        out_json = REPO / "benchmarks" / "results" / "deployment.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"simulation": sim, "deployment": dep, "clientapp_startup_s": startup,
                                        "rounds": ROUNDS}, indent=2) + "\n")


if __name__ == "__main__":
    main()
