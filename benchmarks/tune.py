"""Benchmark: `medfed tune` on BreastMNIST (issue 26). The README quickstart's federation (5 hospitals, Dirichlet
0.5, seed 0, `train.rounds=20`, the default smallcnn), TRIALS trials of the default search space chosen on federated
validation AUC only (every trial withholds the test split), then the best recipe run once with
`medfed simulate --config-file best.yaml`, which reports its test AUC at the best-validation round. Beside it: the
same federation with the default recipe, and its centralized baseline.

    python benchmarks/tune.py --data-dir ../shared/data/medmnist                 # 30 trials (~30-60 min on 2 cores)
    python benchmarks/tune.py --data-dir ../shared/data/medmnist --trials 3 --quick   # a smoke run of the script

Writes the table into docs/benchmarks.md (between the `tune` markers) and benchmarks/results/tune.json.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import benchmark_parser, require_medmnist, run_medfed, write_doc  # noqa: E402

logger = logging.getLogger("benchmarks.tune")

START, END = "<!-- tune:start -->", "<!-- tune:end -->"
FEDERATION = ["federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5", "federation.seed=0"]
FLOOR = 0.90  # issue 26: a validation-selected test AUC of at least this with the default smallcnn


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _test_auc(summary: dict[str, Any]) -> float | None:
    return ((summary.get("best") or {}).get("test") or {}).get("auc")


def _medfed(args: list[str], work: Path, label: str) -> tuple[float, str]:
    code, wall, out = run_medfed(args, cwd=REPO, timeout=6 * 3600)
    (work / f"{label}.log").write_text(out)
    if code != 0:
        raise SystemExit(f"{label} failed (exit {code}):\n{out[-4000:]}")
    return wall, out


def main() -> None:
    parser = benchmark_parser(__doc__, "tune", ["breastmnist"])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    name = args.datasets[0]
    data = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={args.data_dir.resolve()}"]
    rounds = ["train.rounds=2"] if args.quick else ["train.rounds=20"]
    base = [*data, *FEDERATION, *rounds]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cache = ["--cache-dir", str(args.work / "cache")]
    started = time.time()

    tune_args = ["tune", *base, "--trials", str(args.trials), "--parallel", str(args.parallel),
                 "--out", str(args.work / "tune"), *cache]
    logger.info("medfed %s", shlex.join(tune_args))
    tune_wall, tune_out = _medfed(tune_args, args.work, "tune")
    found = json.loads((args.work / "tune" / "tune.json").read_text())
    best_args = ["simulate", "--config-file", str(args.work / "tune" / "best.yaml"), "--run-dir",
                 str(args.work / "best"), *cache]
    logger.info("medfed %s", shlex.join(best_args))
    best_wall, _ = _medfed(best_args, args.work, "best")
    default_wall, _ = _medfed(["simulate", *base, "--run-dir", str(args.work / "default"), *cache], args.work,
                              "default")
    central_wall, _ = _medfed(["baseline", "centralized", *base, "--run-dir", str(args.work / "centralized"),
                               *cache], args.work, "centralized")

    best, default, central = (_summary(args.work / k) for k in ("best", "default", "centralized"))
    trials = found["trials"]
    states = {s: sum(1 for t in trials if t["state"] == s) for s in ("complete", "pruned", "failed", "repeat")}
    best_trial = found["best"]
    best_auc = _test_auc(best)
    results = {
        "dataset": name, "trials": len(trials), "states": states, "tune_wall_s": tune_wall,
        "best_trial": best_trial, "best_recipe": (args.work / "tune" / "best.yaml").read_text(),
        "best": {"val_auc": best["best"]["val"]["auc"], "test_auc": best_auc, "round": best["best"]["round"],
                 "wall_s": best_wall},
        "default": {"val_auc": default["best"]["val"]["auc"], "test_auc": _test_auc(default), "wall_s": default_wall},
        "centralized": {"val_auc": central["best"]["val"]["auc"], "test_auc": _test_auc(central),
                        "wall_s": central_wall},
        "machine": f"{platform.machine()}, CPU only", "total_s": time.time() - started,
        "command": "python benchmarks/tune.py " + " ".join(sys.argv[1:]),
        "tune_command": "medfed " + shlex.join(tune_args).replace(str(REPO) + "/", ""),
    }
    out = REPO / "benchmarks" / "results" / "tune.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    passed = best_auc is not None and best_auc >= FLOOR
    lines = [
        START, "",
        f"`{results['command']}` (total {results['total_s'] / 60:.1f} min on {results['machine']}). {name}, "
        f"`{' '.join(FEDERATION)} {' '.join(rounds)}`, the default smallcnn. The search reads validation data "
        "only; the test AUC is the best-validation round's of one run of each recipe.", "",
        "| recipe | val AUC (selects) | test AUC | wall s |", "|---|---|---|---|",
        f"| default recipe (FedAvg) | {results['default']['val_auc']:.4f} | {results['default']['test_auc']:.4f} | "
        f"{default_wall:.0f} |",
        f"| `medfed tune` best of {len(trials)} (trial {best_trial['number']}), run again from best.yaml | "
        f"{results['best']['val_auc']:.4f} | {best_auc:.4f} | {best_wall:.0f} |",
        f"| centralized baseline, default recipe | {results['centralized']['val_auc']:.4f} | "
        f"{results['centralized']['test_auc']:.4f} | {central_wall:.0f} |", "",
        f"The search: {len(trials)} trials ({states['complete']} complete, {states['pruned']} pruned by the median "
        f"pruner, {states['failed']} failed, {states['repeat']} a recipe already run) in {tune_wall / 60:.1f} min "
        f"wall, {'one trial' if args.parallel == 1 else f'{args.parallel} trials'} at a time "
        f"(`--parallel {args.parallel}`). Best trial's values: "
        + ", ".join(f"`{k}={v}`" for k, v in best_trial["params"].items()) + ".", "",
        f"Floor (issue 26): validation-selected test AUC >= {FLOOR} with the default smallcnn: "
        f"{best_auc:.4f}: **{'PASS' if passed else 'FAIL'}**.", "",
        f"The search's command: `{results['tune_command']}`", "",
        END,
    ]
    write_doc("\n".join(lines), args.doc, start=START, end=END, heading="Tuning: `medfed tune` on BreastMNIST")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
