"""Benchmark: many simulated hospitals on one machine, and lean updates (issue 27).

1. Scale: `medfed simulate` (a real Flower simulation, its own process) with 10, 100 and 1,000 simulated hospitals,
   10 asked per round to train and 10 to evaluate (`strategy.fraction_train = fraction_evaluate = 10 / N`, every
   `min_*_nodes` 10), each hospital holding 20 synthetic 28 x 28 images (`dataset.n_train = 20 N`: 16 train, 4
   validation), `--rounds` rounds (8), `--repeats` runs (2) of each N, the Ns alternating. Per N: seconds per round
   (the median of every run's rounds 2.., from metrics.jsonl's `elapsed_s`; round 1 also pays Ray's workers and the
   sites' cache), round 1's seconds and the wall time (medians), and the peak memory sampled every 0.2 s over the whole process tree (the driver, Ray's GCS, raylet and workers):
   the sum of PSS (proportional set size: a shared page counted once in all, the memory the run really holds)
   and, for reference, the sum of RSS (shared pages, e.g. torch's libraries in every worker, counted per process).
   Floors: 1,000 hospitals run, peak <= 8 GiB, seconds per round at 1,000 <= 1.5 x at 10.
2. Compression: PneumoniaMNIST, 5 hospitals, Dirichlet 0.5, seed 0, `train.rounds=20 train.local_epochs=1`,
   everything else default (the README's quickstart before the default counted steps), with
   `strategy.compression=none|fp16|int8`: test AUC (round chosen on validation), the bytes every training reply
   had when the coordinator received it (metrics.jsonl `bytes_up`: mean and max per hospital per round) against the
   float32 model. Floors: none <= 1.02 x, int8 <= 0.27 x the float32 model,
   int8's AUC within 0.005 of none's.

    python benchmarks/scale.py                     # both parts, ~30 min on 2 cores
    python benchmarks/scale.py --only scale        # one part (the other part's figures are kept)
    python benchmarks/scale.py --quick             # a smoke run of the script (N = 10, 30; 2 rounds; synthetic)

Writes docs/benchmarks.md (between the `scale` markers) and benchmarks/results/scale.json (`--quick`: WORK/scale-quick.json only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import write_doc  # noqa: E402  (benchmarks/ is the script's folder)

START, END = "<!-- scale:start -->", "<!-- scale:end -->"
GIB = 1 << 30


def _tree(root: int) -> list[int]:
    """``root`` and every process descending from it (Ray's GCS, raylet and workers descend from the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """A process's PSS and RSS in bytes (0, 0 once it has gone)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


class TreeSampler:
    """The peak of the summed PSS and RSS of a process tree, sampled in a thread."""

    def __init__(self, root: int, every: float = 0.2) -> None:
        self.root, self.every = root, every
        self.peak_pss = self.peak_rss = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.root)
            sums = np.sum([_memory(p) for p in pids], axis=0)
            self.peak_pss, self.peak_rss = max(self.peak_pss, int(sums[0])), max(self.peak_rss, int(sums[1]))
            self.processes = max(self.processes, len(pids))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(work / "flwr-home"), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    return env


def simulate(args: list[str], run_dir: Path, work: Path) -> dict[str, Any]:
    """``medfed simulate ARGS`` in its own process (session), its memory sampled; the run's figures."""
    command = [sys.executable, "-m", "medfed.cli.main", "simulate", "--run-dir", str(run_dir),
               "--cache-dir", str(work / "cache"), *args]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time (the cache folder is kept)
    started = time.perf_counter()
    log = (work / f"{run_dir.name}.log").open("w")
    proc = subprocess.Popen(command, cwd=work, env=_env(work), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    try:
        code = proc.wait(timeout=3 * 3600)
    finally:
        sampler.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # by the PID of the session we started
        log.close()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"`{' '.join(command)}` exited {code}; see {work / (run_dir.name + '.log')}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    elapsed = [line["elapsed_s"] for line in lines]
    per_round = np.diff(elapsed)
    trained = [s for line in lines for s in line["sites"].values() if s.get("trained")]
    return {"wall_s": wall, "round1_s": elapsed[0], "round_s": [float(x) for x in per_round],
            "s_per_round": float(np.median(per_round)) if per_round.size else None,
            "rounds": len(lines), "peak_pss": sampler.peak_pss, "peak_rss_sum": sampler.peak_rss,
            "processes": sampler.processes, "trained_per_round": len(trained) / max(1, len(lines)),
            "bytes_up": [s["bytes_up"] for s in trained if "bytes_up" in s],
            "test_auc": (summary.get("best") or {}).get("test", {}).get("auc"),
            "best_round": (summary.get("best") or {}).get("round"), "command": " ".join(["medfed", *command[3:]])}


def scale_part(work: Path, sizes: list[int], rounds: int, asked: int, repeats: int) -> list[dict[str, Any]]:
    """Each size ``repeats`` times, the sizes alternating (10, 100, 1000, 10, ...), so load that other work puts on
    a shared machine falls on every size alike; per size the median of all its later rounds' seconds."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for repeat in range(repeats):
        for n in sizes:
            fraction = min(1.0, asked / n)
            args = [f"federation.hospitals={n}", f"dataset.n_train={20 * n}", "dataset.n_test=400",
                    f"strategy.fraction_train={fraction:.6g}", f"strategy.fraction_evaluate={fraction:.6g}",
                    f"strategy.min_train_nodes={asked}", f"strategy.min_evaluate_nodes={asked}",
                    f"strategy.min_available_nodes={asked}", f"train.rounds={rounds}", "train.local_epochs=1"]
            run = simulate(args, work / f"scale-{n}", work)
            print(f"{n:>5} hospitals (run {repeat + 1}): {run['s_per_round']:.2f} s/round (round 1 "
                  f"{run['round1_s']:.1f} s), wall {run['wall_s']:.0f} s, peak PSS {run['peak_pss'] / GIB:.2f} GiB "
                  f"(RSS sum {run['peak_rss_sum'] / GIB:.2f} GiB, {run['processes']} processes)", flush=True)
            runs[n].append(run)
    rows = []
    for n, done in runs.items():
        seconds = [s for run in done for s in run["round_s"]]
        rows.append({"hospitals": n, "asked": asked, "runs": len(done), "rounds": done[0]["rounds"],
                     "s_per_round": float(np.median(seconds)), "round_s": seconds,
                     "round1_s": float(np.median([r["round1_s"] for r in done])),
                     "wall_s": float(np.median([r["wall_s"] for r in done])),
                     "peak_pss": max(r["peak_pss"] for r in done), "peak_rss_sum": max(r["peak_rss_sum"] for r in done),
                     "processes": max(r["processes"] for r in done), "command": done[0]["command"]})
    return rows


def _model_bytes(run_dir: Path) -> int:
    from medfed.common.models.weights import load_checkpoint

    final, _ = load_checkpoint(run_dir / "model.pt")
    return sum(np.asarray(v).nbytes for v in final.values() if np.asarray(v).dtype == np.float32)


def compression_part(work: Path, data_dir: Path, quick: bool) -> list[dict[str, Any]]:
    rows = []
    base = (["train.rounds=2", "federation.hospitals=5"] if quick else
            ["dataset=medmnist", "dataset.name=pneumoniamnist", f"dataset.data_path={data_dir}",
             "federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5", "federation.seed=0",
             # one epoch a round: the recipe the documented figures were measured with (the
             # default counts steps since issue 26)
             "train.rounds=20", "train.local_epochs=1"])
    for method in ("none", "fp16", "int8"):
        run_dir = work / f"compression-{method}"
        row = {"compression": method, **simulate([*base, f"strategy.compression={method}"], run_dir, work)}
        model = _model_bytes(run_dir)
        sizes = row.pop("bytes_up")
        row.update(model_bytes=model, bytes_mean=float(np.mean(sizes)), bytes_max=int(max(sizes)),
                   ratio_max=max(sizes) / model)
        print(f"{method}: test AUC {row['test_auc']:.4f} (round {row['best_round']}), bytes up per hospital per round "
              f"mean {row['bytes_mean']:.0f}, max {row['bytes_max']} = {row['ratio_max']:.4f} x the float32 model "
              f"({model} B), wall {row['wall_s']:.0f} s", flush=True)
        rows.append(row)
    return rows


def _doc(result: dict[str, Any]) -> str:
    scale, comp = result.get("scale", []), result.get("compression", [])
    out = [START, "", f"`python benchmarks/scale.py` ({result['date']}, {result['machine']}; no GPU).", ""]
    if scale:
        out += ["Simulated hospitals, 10 asked per round (train and evaluate), 20 synthetic images each, "
                f"{scale[0]['rounds']} rounds, {scale[0]['runs']} runs of each size alternating; s / round = the median "
                "of every run's rounds 2.. (min-max in brackets), round 1 and wall = medians; memory = the whole process "
                "tree (driver, Ray's GCS, raylet, workers), sampled every 0.2 s, the larger run's peak:", "",
                "| hospitals simulated | s / round (rounds 2..) | round 1 s | wall s | peak PSS (GiB) | "
                "peak RSS sum (GiB) | processes |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in scale:
            out.append(f"| {r['hospitals']} | {r['s_per_round']:.2f} ({min(r['round_s']):.2f}-{max(r['round_s']):.2f}) | "
                       f"{r['round1_s']:.1f} | {r['wall_s']:.0f} | "
                       f"{r['peak_pss'] / GIB:.2f} | {r['peak_rss_sum'] / GIB:.2f} | {r['processes']} |")
        first, last = scale[0], scale[-1]
        out += ["", f"Seconds per round at {last['hospitals']} simulated / at {first['hospitals']}: "
                f"**{last['s_per_round'] / first['s_per_round']:.2f} x** (floor 1.5); peak PSS at {last['hospitals']}: "
                f"**{last['peak_pss'] / GIB:.2f} GiB** (floor 8).", "",
                f"Command of the largest row: `{last['command']}`", ""]
    if comp:
        none = next(r for r in comp if r["compression"] == "none")
        out += ["Lean updates, `strategy.compression` (PneumoniaMNIST, 5 hospitals, Dirichlet 0.5, seed 0, 20 rounds, "
                "defaults otherwise; bytes = a training reply as the coordinator received it, metrics.jsonl "
                "`bytes_up`):", "",
                "| compression | test AUC (val-chosen round) | change vs none | bytes up / hospital / round (mean) | "
                "max / float32 model | wall s |", "|---|---:|---:|---:|---:|---:|"]
        for r in comp:
            out.append(f"| {r['compression']} | {r['test_auc']:.4f} ({r['best_round']}) | "
                       f"{r['test_auc'] - none['test_auc']:+.4f} | {r['bytes_mean']:.0f} | {r['ratio_max']:.4f} | "
                       f"{r['wall_s']:.0f} |")
        out += ["", f"The float32 model: {none['model_bytes']} bytes. Command: `{none['command']}` (and "
                "`strategy.compression=fp16|int8`).", ""]
    out.append(END)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "scale")
    parser.add_argument("--only", choices=["scale", "compression"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--asked", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each size, alternating")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.repeats = [10, 30], 2, 1
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "scale-quick.json" if args.quick else REPO / "benchmarks" / "results" / "scale.json"
    result: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    result.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, {os.cpu_count()} cores")
    if args.only in (None, "scale"):
        result["scale"] = scale_part(args.work, args.sizes, args.rounds, args.asked, args.repeats)
    if args.only in (None, "compression"):
        result["compression"] = compression_part(args.work, args.data_dir, args.quick)
    results_path.write_text(json.dumps(result, indent=1))
    section = _doc(result)
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=START, end=END, heading="Scale: many simulated hospitals, lean updates")


if __name__ == "__main__":
    main()
