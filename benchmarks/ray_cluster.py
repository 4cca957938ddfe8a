"""Benchmark: the same small simulation on the local engine (a private Ray that `medfed simulate` starts) and on a
two-node Ray cluster started on this machine (`medfed simulate --ray-address`), wall time against wall time.

The same recipe both ways: the synthetic task, 4 hospitals, FedAvg, ROUNDS rounds, one CPU and one torch thread per
hospital (`federation.cpus_per_hospital=1 federation.threads=1`), so two hospitals train at once either way: on the
private Ray's 2 CPUs, or on the cluster's head and worker node, 1 CPU each (`ray start --block` processes with their
own temporary directories and ports; tests/ray_cluster.py). The cluster is started once, before the runs, and is not
counted in them (its start is reported apart). An untimed 1-round local run first fills the data cache and the
page cache; then the runs alternate, local and cluster, in ABBA order (local, cluster, cluster, local, ...), REPEATS
of each; the table gives the medians and every run's wall time. The machine is shared: its load average is
reported too.

    python benchmarks/ray_cluster.py           # ~4 min on 2 cores
    python benchmarks/ray_cluster.py --quick   # 2 rounds, once each: checks the script, not the figures

Prints the commands and the wall times; writes them into docs/benchmarks.md (between the `ray_cluster` markers) and
benchmarks/results/ray_cluster.json (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import run_medfed, write_doc  # noqa: E402  (benchmarks/ is the script's folder)

from tests.ray_cluster import LocalRayCluster  # noqa: E402

logger = logging.getLogger("benchmarks.ray_cluster")

START, END = "<!-- ray_cluster:start -->", "<!-- ray_cluster:end -->"
ROUNDS = 5
REPEATS = 2
RECIPE = ["dataset=synthetic", "federation.hospitals=4", "federation.cpus_per_hospital=1", "federation.threads=1",
          # one epoch a round: the recipe the documented figures were measured with (the
          # default counts steps since issue 26)
          "train.local_epochs=1"]


def measure(run_dir: Path, process_s: float) -> dict[str, Any]:
    """A run's wall times: the whole `medfed simulate` process, round 1 (with the start-up: Ray started or joined,
    the actors' imports), the later rounds' mean, and where its hospitals ran."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    elapsed = [line["elapsed_s"] for line in lines]
    walls = [b - a for a, b in zip(elapsed, elapsed[1:])]
    nodes = {site.get("ray_node") for line in lines for site in line["sites"].values()}
    return {"process_s": process_s, "run_wall_s": summary["wall_s"], "first_round_s": elapsed[0],
            "round_s": statistics.mean(walls) if walls else float("nan"), "rounds": len(lines),
            "ray_nodes": len(nodes - {None}), "test_auc_final": lines[-1]["test"]["auc"]}


def simulate(work: Path, name: str, recipe: list[str], extra: list[str]) -> tuple[dict[str, Any], list[str]]:
    args = ["simulate", "--run-dir", str(work / name), "--cache-dir", str(work / "cache"), *extra, *recipe]
    code, wall, out = run_medfed(args, cwd=work, timeout=1800)
    if code != 0:
        raise SystemExit(f"medfed {' '.join(args)} failed (exit {code}):\n{out[-4000:]}")
    result = measure(work / name, wall)
    logger.info("%s: %s", name, result)
    return result, args


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def render(local: list[dict[str, Any]], cluster: list[dict[str, Any]], cluster_start_s: float,
           loads: list[float], total_s: float, command: str, commands: list[str]) -> str:
    def row(name: str, runs: list[dict[str, Any]]) -> str:
        each = ", ".join(f"{r['process_s']:.1f}" for r in runs)
        return (f"| {name} | {_median(runs, 'process_s'):.1f} ({each}) | {_median(runs, 'run_wall_s'):.1f} | "
                f"{_median(runs, 'first_round_s'):.1f} | {_median(runs, 'round_s'):.2f} | {runs[0]['ray_nodes']} | "
                f"{runs[0]['test_auc_final']:.4f} |")

    ratio = _median(cluster, "process_s") / _median(local, "process_s")
    lines = [
        START,
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, no GPU, a machine "
        f"shared with other jobs (load average {min(loads):.1f}-{max(loads):.1f} during the runs); whole script "
        f"{total_s / 60:.1f} min. Reproduce with:",
        "",
        f"    {command}",
        "",
        f"Synthetic task, 4 hospitals, FedAvg, {local[0]['rounds']} rounds, one CPU and one torch thread per hospital "
        "(`" + " ".join(RECIPE) + "`), so two hospitals train at once both ways: on the 2 CPUs of the private Ray "
        "that `medfed simulate` starts (local engine), or on a head and a worker node of a Ray cluster on this "
        f"machine, 1 CPU each, started once before the runs in {cluster_start_s:.1f} s (not counted below). After an "
        f"untimed warm-up run the runs alternated in ABBA order, {len(local)} of each; medians, each process's wall "
        "time in brackets. Commands (in a temporary folder):",
        "",
        *[f"    medfed {c}" for c in commands],
        "",
        "| engine | `medfed simulate` wall s | run wall s (summary.json) | round 1 s (with start-up) | later rounds s "
        "(mean) | Ray nodes used | final test AUC |",
        "|---|---|---|---|---|---|---|",
        row("local (private Ray)", local),
        row("Ray cluster, 2 nodes (`--ray-address`)", cluster),
        "",
        f"The cluster run took {ratio:.2f} x the local run's wall time. Round 1 holds the start-up: the local engine "
        "starts its Ray there (GCS, raylet, workers), the cluster run only joins the running cluster and starts its "
        "actors; later rounds differ by where the two hospitals at a time train (two actors on one node, or one on "
        "each) and by the load of the shared machine. The final models are the same (the same seeds, replies "
        "aggregated in site order), so the AUCs match.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, once each: checks the script, not the figures")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    repeats = 1 if args.quick else args.repeats
    recipe = [*RECIPE, f"train.rounds={2 if args.quick else ROUNDS}"]
    started = time.time()
    local: list[dict[str, Any]] = []
    cluster_runs: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    commands: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medfed-bench-ray-") as tmp:
        work = Path(tmp)
        # the `medfed` processes' Flower home and simulated hospitals' ledgers: this run's own, removed with it
        os.environ.update(FLWR_HOME=str(work / "flwr-home"), MEDFED_STATE_DIR=str(work / "state"))
        cluster_started = time.perf_counter()
        with LocalRayCluster(workers=1, cpus=1) as cluster:
            cluster_start_s = time.perf_counter() - cluster_started
            logger.info("two-node cluster at %s in %.1f s: %s", cluster.address, cluster_start_s, cluster.nodes)
            simulate(work, "warm-up", [*RECIPE, "train.rounds=1"], [])
            order = [engine for index in range(repeats) for engine in (("local", "cluster") if index % 2 == 0
                                                                        else ("cluster", "local"))]
            arguments: dict[str, list[str]] = {}
            for index, engine in enumerate(order):
                extra = ["--ray-address", cluster.address] if engine == "cluster" else []
                result, arguments[engine] = simulate(work, f"{engine}-{index}", recipe, extra)
                (cluster_runs if engine == "cluster" else local).append(result)
                loads.append(os.getloadavg()[0])
            commands = [shlex.join(arguments[e]).replace(str(work) + "/", "") for e in ("local", "cluster")]
    command = "python benchmarks/ray_cluster.py" + (" --quick" if args.quick else "")
    section = render(local, cluster_runs, cluster_start_s, loads, time.time() - started, command, commands)
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=START, end=END, heading="Simulation on a Ray cluster vs the local engine")
        out_json = REPO / "benchmarks" / "results" / "ray_cluster.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"local": local, "cluster": cluster_runs, "cluster_start_s": cluster_start_s,
                                        "load_average": loads, "recipe": recipe}, indent=2) + "\n")


if __name__ == "__main__":
    main()
