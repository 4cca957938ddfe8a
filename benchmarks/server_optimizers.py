"""Benchmark: the server optimizers' defaults under strong label skew (issue 26). FedAdam and FedYogi with candidate
(eta, tau) pairs against FedAvg, on the strategies benchmark's recipes (benchmarks/strategies.py) at Dirichlet 0.1,
5 hospitals, seed 0. The defaults are chosen on federated *validation* AUC (the mean over both datasets and both
optimizers); the test AUC at the best-validation round is only reported.

    python benchmarks/server_optimizers.py --data-dir ../shared/data/medmnist     # ~15-20 min on 2 cores

Writes the table into docs/benchmarks.md (between the `server-optimizers` markers) and
benchmarks/results/server_optimizers.json.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import benchmark_parser, require_medmnist, run_medfed, write_doc  # noqa: E402
from strategies import RECIPES  # noqa: E402

logger = logging.getLogger("benchmarks.server_optimizers")

START, END = "<!-- server-optimizers:start -->", "<!-- server-optimizers:end -->"
FEDERATION = ["federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.1", "federation.seed=0"]
# (eta, tau): the old defaults first (Flower's tau, eta 0.01), then smaller server steps and a larger tau (a step
# proportional to the averaged update while it is small against tau, capped near eta when it is large)
CANDIDATES: list[tuple[float, float]] = [(1e-2, 1e-3), (1e-3, 1e-3), (3e-3, 1e-3), (1e-2, 1e-2), (3e-3, 3e-3)]


def _run(args: list[str], run_dir: Path) -> dict[str, Any]:
    code, wall, out = run_medfed([*args, "--run-dir", str(run_dir)], cwd=REPO, timeout=3600)
    if code != 0:
        raise SystemExit(f"{run_dir.name} failed (exit {code}):\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]
    return {"val_auc": best["val"]["auc"], "test_auc": best["test"]["auc"], "round": best["round"], "wall_s": wall}


def main() -> None:
    parser = benchmark_parser(__doc__, "server-optimizers", list(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.time()
    results: dict[str, Any] = {}
    for name in args.datasets:
        recipe = ["train.rounds=2", "train.local_epochs=1"] if args.quick else RECIPES[name]
        base = ["simulate", "--cache-dir", str(args.work / "cache"), "dataset=medmnist", f"dataset.name={name}",
                f"dataset.data_path={args.data_dir.resolve()}", *FEDERATION, *recipe]
        rows: dict[str, Any] = {"fedavg": _run([*base, "strategy=fedavg"], args.work / f"{name}-fedavg")}
        logger.info("%s fedavg: %s", name, rows["fedavg"])
        for strategy in ("fedadam", "fedyogi"):
            for eta, tau in CANDIDATES:
                label = f"{strategy} eta={eta:g} tau={tau:g}"
                rows[label] = _run([*base, f"strategy={strategy}", f"strategy.eta={eta:g}", f"strategy.tau={tau:g}"],
                                   args.work / f"{name}-{strategy}-{eta:g}-{tau:g}")
                logger.info("%s %s: %s", name, label, rows[label])
        results[name] = {"recipe": recipe, "rows": rows}
    # the choice: the (eta, tau) with the highest mean validation AUC over both optimizers and datasets
    mean_val = {c: sum(results[n]["rows"][f"{s} eta={c[0]:g} tau={c[1]:g}"]["val_auc"]
                       for n in results for s in ("fedadam", "fedyogi")) / (2 * len(results)) for c in CANDIDATES}
    chosen = max(CANDIDATES, key=lambda c: mean_val[c])
    payload = {"results": results, "mean_val_auc": {f"eta={c[0]:g} tau={c[1]:g}": v for c, v in mean_val.items()},
               "chosen": {"eta": chosen[0], "tau": chosen[1]}, "total_s": time.time() - started,
               "machine": f"{platform.machine()}, CPU only",
               "command": "python benchmarks/server_optimizers.py " + " ".join(sys.argv[1:])}
    (REPO / "benchmarks" / "results" / "server_optimizers.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [START, "", f"`{payload['command']}` (total {payload['total_s'] / 60:.1f} min on {payload['machine']}). "
             f"`{' '.join(FEDERATION)}`, the strategies benchmark's recipe per dataset. Validation AUC selects "
             "(the best-validation round, and the defaults); test AUC at that round is reported.", ""]
    header = "| method | " + " | ".join(f"{n} val | {n} test" for n in results) + " | mean val (FedAdam, FedYogi) |"
    lines += [header, "|" + "---|" * (2 + 2 * len(results))]
    for label in results[next(iter(results))]["rows"]:
        cells = " | ".join(f"{results[n]['rows'][label]['val_auc']:.4f} | {results[n]['rows'][label]['test_auc']:.4f}"
                           for n in results)
        pair = next((c for c in CANDIDATES if label.endswith(f"eta={c[0]:g} tau={c[1]:g}")), None)
        lines.append(f"| {label} | {cells} | {mean_val[pair]:.4f} |" if pair else f"| {label} | {cells} | |")
    lines += ["", f"Chosen on validation: eta={chosen[0]:g}, tau={chosen[1]:g} (the defaults of strategy=fedadam, "
              "fedyogi and fedadagrad).", "", END]
    write_doc("\n".join(lines), args.doc, start=START, end=END,
              heading="Server optimizers: defaults under label skew")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
