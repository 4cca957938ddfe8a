"""Benchmark: centralized vs local-only vs FedAvg on real MedMNIST data, plus the default demo's wall time.

5 hospitals, Dirichlet(0.5) label skew, seed 0, the same config, model and training budget for every method.
Test AUC/ACC are reported at the best-*validation* round (each local hospital at its own best round). Every run is a
`medfed` process of its own (started in a new session and killed by PID when done), reading its figures from the
run's summary.json.

    python benchmarks/baselines.py --data-dir ../shared/data/medmnist          # ~15 min on 2 cores
    python benchmarks/baselines.py --data-dir ../shared/data/medmnist --quick  # a smoke run of the script

Writes the results into docs/benchmarks.md (between the `baselines` markers) and benchmarks/results/baselines.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.common.errors import PrivacyBudgetExceeded

logger = logging.getLogger("benchmarks.baselines")

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- baselines:start -->", "<!-- baselines:end -->"

# Recipes: training budget per dataset (identical for the three methods). Chosen on federated *validation* AUC
# (a sweep over local epochs / optimizer / class weighting on BreastMNIST; see docs/benchmarks.md), never on test.
RECIPES: dict[str, list[str]] = {
    "pneumoniamnist": ["train.rounds=20", "train.local_epochs=2", "train.lr_schedule=cosine"],
    "breastmnist": ["train.rounds=30", "train.local_epochs=10"],
}
FEDERATION = ["federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5", "federation.seed=0"]


# medfed's exit code for a run in which every hospital refused to train at its privacy cap: the run still has a
# summary.json, and its row says so
TRAINED_NOWHERE = PrivacyBudgetExceeded.exit_code


def run_medfed(args: list[str], *, cwd: Path, timeout: float) -> tuple[int, float, str]:
    """Run one `medfed` command in its own session; always kill its process group by PID afterwards."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONPATH=str(REPO))
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli.main", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    return proc.returncode, time.time() - started, out


def bench_dataset(name: str, data_dir: Path, work: Path, quick: bool, recipe: list[str] | None = None
                  ) -> dict[str, Any]:
    """Centralized, local-only and FedAvg runs of ``name`` with ``recipe`` (default: :data:`RECIPES`)."""
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else (RECIPES[name] if recipe is None else recipe)
    common = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION, *recipe]
    results: dict[str, Any] = {"overrides": common}
    for method, command in (
        ("centralized", ["baseline", "centralized"]),
        ("local", ["baseline", "local"]),
        ("fedavg", ["simulate"]),
    ):
        run_dir = work / f"{name}-{method}"
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        args = [*command, "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), *common]
        logger.info("%s %s: medfed %s", name, method, " ".join(args))
        code, wall, out = run_medfed(args, cwd=REPO, timeout=3600)
        if code != 0:
            raise SystemExit(f"{name} {method} failed (exit {code}):\n{out[-4000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        results[method] = {
            "test_auc": summary["best"]["test"]["auc"],
            "test_acc": summary["best"]["test"]["acc"],
            "best_round": summary["best"]["round"],
            "wall_s": summary["wall_s"],
            "process_s": wall,
            "compute_s": summary["compute_s"],
            "overhead": summary["overhead"],
            "local": summary.get("local"),
            "command": "medfed " + " ".join([*command, "--run-dir", f"runs/{name}-{method}", *common]),
        }
        logger.info("  -> test AUC %.4f", summary["best"]["test"]["auc"])
    return results


def floors(name: str, r: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """The issue's floors as (text, passed); None marks a figure that is reported, not a floor."""
    fed, cen, loc = r["fedavg"]["test_auc"], r["centralized"]["test_auc"], r["local"]["local"]["test_auc"]["mean"]
    checks = [(f"FedAvg overhead x{r['fedavg']['overhead']:.3f} <= 1.15", r["fedavg"]["overhead"] <= 1.15)]
    if name == "pneumoniamnist":
        checks += [
            (f"FedAvg AUC {fed:.4f} >= 0.99 x centralized {cen:.4f} = {0.99 * cen:.4f}", fed >= 0.99 * cen),
            (f"FedAvg AUC {fed:.4f} >= 0.944 (published ResNet-18, 28 px)", fed >= 0.944),
        ]
    if name == "breastmnist":
        checks += [
            (f"FedAvg AUC {fed:.4f} >= 0.95 x centralized {cen:.4f} = {0.95 * cen:.4f}", fed >= 0.95 * cen),
            (f"FedAvg AUC {fed:.4f} >= mean local-only {loc:.4f} + 0.05 = {loc + 0.05:.4f}", fed >= loc + 0.05),
            (f"FedAvg AUC {fed:.4f} vs the published centralized ResNet-18 (28 px) 0.901: {fed - 0.901:+.4f}", None),
        ]
    return checks


def method_cells(r: dict[str, Any]) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    """Each method's table cells (method, test AUC, test ACC, best round) and its record; local-only as the mean
    and min-max over the hospitals' own models."""
    cells = []
    for method in ("centralized", "local", "fedavg"):
        m = r[method]
        if method == "local":
            a, c = m["local"]["test_auc"], m["local"]["test_acc"]
            cells.append((method, f"{a['mean']:.4f} ({a['min']:.3f}-{a['max']:.3f})",
                          f"{c['mean']:.4f} ({c['min']:.3f}-{c['max']:.3f})", "per site", m))
        else:
            cells.append((method, f"{m['test_auc']:.4f}", f"{m['test_acc']:.4f}", str(m["best_round"]), m))
    return cells


def measured(total_s: float, command: str) -> list[str]:
    """A benchmark section's first lines: where and when it was measured, and the command that reproduces it."""
    return [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, no GPU, "
            f"Python {platform.python_version()}; whole script {total_s / 60:.1f} min. Reproduce with:",
            "", f"    {command}", ""]


def render(results: dict[str, Any], demo: dict[str, Any], total_s: float, command: str) -> str:
    lines = [
        START,
        *measured(total_s, command),
        "5 hospitals, Dirichlet(alpha=0.5) label skew, seed 0, model `smallcnn` (130k parameters, GroupNorm), "
        "AdamW lr 1e-3, batch 32. Test AUC/ACC on the official test split at the best-validation round "
        "(local-only: each hospital's own model at its own best round; mean, min-max over hospitals). "
        "Overhead = wall time / time inside local training, local evaluation and server evaluation.",
        "",
        "| dataset | budget | method | test AUC | test ACC | best round | wall s | compute s | overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        budget = " ".join(o.split(".", 1)[1] for o in r["overrides"] if o.startswith("train."))
        for method, auc, acc, best, m in method_cells(r):
            lines.append(
                f"| {name} | {budget} | {method} | {auc} | {acc} | {best} | {m['wall_s']:.1f} | "
                f"{m['compute_s']:.1f} | {m['overhead']:.3f} |"
            )
    lines += ["", "Floors:", ""]
    for name, r in results.items():
        for text, ok in floors(name, r):
            verdict = "reported" if ok is None else ("PASS" if ok else "FAIL")
            lines.append(f"- {name}: {text} — {verdict}")
    lines.append(
        f"- default demo `medfed simulate` (synthetic, 3 hospitals, 5 rounds): {demo['wall_s']:.1f} s "
        f"(process {demo['process_s']:.1f} s) < 180 s — {'PASS' if demo['process_s'] < 180 else 'FAIL'}"
    )
    lines.append(f"- full benchmark {total_s / 60:.1f} min < 60 min — {'PASS' if total_s < 3600 else 'FAIL'}")
    lines.append(END)
    return "\n".join(lines)


def write_doc(
    section: str,
    path: Path,
    *,
    start: str = START,
    end: str = END,
    heading: str = "Walking skeleton: centralized vs local-only vs FedAvg",
) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into ``path``, replacing the old one."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# medfed benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def benchmark_parser(doc: str | None, work: str, datasets: list[str]) -> argparse.ArgumentParser:
    """The options every benchmark script takes (data folder, work folder, datasets, --quick, the doc to write)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / work)
    parser.add_argument("--datasets", nargs="+", default=datasets)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 1 epoch: checks the script, not the figures")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    return parser


def per_dataset(doc: str | None, script: str, bench: Callable[[str, Path, Path, bool], dict[str, Any]],
                render: Callable[[dict[str, Any], float, str], str], *, start: str, end: str, heading: str) -> None:
    """A benchmark script's main: parse the common options, run ``bench`` on each dataset, print ``render``'s
    section and (unless ``--quick``) write it into the doc and the results into ``benchmarks/results/SCRIPT.json``."""
    args = benchmark_parser(doc, script, ["pneumoniamnist", "breastmnist"]).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {name: bench(name, args.data_dir.resolve(), args.work.resolve(), args.quick) for name in args.datasets}
    total = time.time() - started
    section = render(results, total, f"python benchmarks/{script}.py" + (" --quick" if args.quick else ""))
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=start, end=end, heading=heading)
        out = REPO / "benchmarks" / "results" / f"{script}.json"
        out.write_text(json.dumps({"results": results, "total_s": total}, indent=2) + "\n")


def require_medmnist(data_dir: Path, names: list[str]) -> None:
    """Stop with a clear message unless every ``NAME.npz`` is in ``data_dir`` (benchmarks never download)."""
    for name in names:
        if not (data_dir / f"{name}.npz").is_file():
            raise SystemExit(f"{name}.npz not found in {data_dir}; pass --data-dir DIR holding the MedMNIST files")


def main() -> None:
    args = benchmark_parser(__doc__, "bench", list(RECIPES)).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    demo_dir = args.work / "demo"
    subprocess.run(["rm", "-rf", str(demo_dir)], check=True)
    code, demo_wall, out = run_medfed(
        ["simulate", "--run-dir", str(demo_dir), "--cache-dir", str(args.work / "cache")], cwd=REPO, timeout=600
    )
    if code != 0:
        raise SystemExit(f"default demo failed:\n{out[-4000:]}")
    demo = {"process_s": demo_wall, "wall_s": json.loads((demo_dir / "summary.json").read_text())["wall_s"]}
    logger.info("default demo: %.1f s", demo_wall)

    results = {
        name: bench_dataset(name, args.data_dir.resolve(), args.work.resolve(), args.quick) for name in args.datasets
    }
    total = time.time() - started
    command = "python benchmarks/baselines.py --data-dir ../shared/data/medmnist" + (" --quick" if args.quick else "")
    section = render(results, demo, total, command)
    print(section)
    if not args.quick:
        write_doc(section, args.doc)
        out_json = REPO / "benchmarks" / "results" / "baselines.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"demo": demo, "results": results, "total_s": total}, indent=2) + "\n")


if __name__ == "__main__":
    main()
