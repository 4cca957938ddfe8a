"""Benchmark: what metering evaluation costs under DP (issue 21). Epsilon 8 at every hospital, 5 hospitals,
Dirichlet(0.5), seed 0, the recipes of benchmarks/privacy.py; for each dataset:

- **exact**: validation metrics, training loss and counts released exactly (``privacy.exact_metrics=true``: the
  behaviour before metering, research only);
- **noised** (the default): every evaluation a Gaussian release of noised sufficient statistics, charged to each
  hospital's ledger; the coordinator selects the round on the metrics of the pooled noised statistics; FedAvg
  weighs hospitals equally (no exact count leaves). Repeated ``--repeats`` times: the noise is drawn from the
  operating system's entropy, never from the run's seed, so each repeat is a fresh draw.

Test AUC is read at the round selected on validation data (the coordinator's public test set only reports).
From each hospital's ledger: epsilon in all, epsilon of its training rounds alone and of its evaluations alone
(each composed by Opacus' RDP accountant), and the share of the total that the evaluations add
(``1 - training alone / total``).

    python benchmarks/metered_evaluation.py --data-dir ../shared/data/medmnist            # ~20 min on 2 cores
    python benchmarks/metered_evaluation.py --data-dir ../shared/data/medmnist --quick    # a smoke run

Writes docs/benchmarks.md (between the `metered` markers) and benchmarks/results/metered_evaluation.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import FEDERATION, benchmark_parser, require_medmnist, run_medfed, write_doc  # noqa: E402
from privacy import DP_FIXED, RECIPES  # noqa: E402

from medfed.client.ledger import site_ledgers  # noqa: E402
from medfed.client.privacy import epsilon_spent  # noqa: E402

logger = logging.getLogger("benchmarks.metered_evaluation")

START, END = "<!-- metered:start -->", "<!-- metered:end -->"
EPSILON = 8.0
FLOOR = 0.01  # the selected model's test AUC within this of exact evaluation


def _ledger_figures(state_dir: Path) -> dict[str, Any]:
    """Per hospital ledger: epsilon in all, of training alone, of evaluations alone, the evaluations' share."""
    sites = []
    for ledger in site_ledgers(state_dir):
        entries = ledger.entries()
        train = [e for e in entries if e.kind == "train"]
        released = [e for e in entries if e.kind != "train"]
        total = epsilon_spent(entries, 1e-5)
        alone = epsilon_spent(train, 1e-5)
        sites.append({"epsilon": total, "training_alone": alone, "evaluations_alone": epsilon_spent(released, 1e-5),
                      "evaluations": len(released), "train_noise": train[-1].noise_multiplier if train else None,
                      "eval_noise": released[-1].noise_multiplier if released else None,
                      "share": 1 - alone / total if total > 0 else 0.0})
    return {"sites": sites,
            "share_mean": statistics.mean(s["share"] for s in sites) if sites else None,
            "epsilon_max": max((s["epsilon"] for s in sites), default=None)}


def _run(name: str, label: str, common: list[str], extra: list[str], work: Path) -> dict[str, Any]:
    run_dir, state_dir = work / f"{name}-{label}", work / f"{name}-{label}-state"
    for path in (run_dir, state_dir):
        shutil.rmtree(path, ignore_errors=True)
    args = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), "--state-dir", str(state_dir),
            *common, *extra]
    logger.info("%s %s: medfed %s", name, label, " ".join(args))
    code, _, out = run_medfed(args, cwd=REPO, timeout=3600)
    if code != 0:
        raise SystemExit(f"{name} {label} failed (exit {code}):\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    result = {
        "best_round": summary["best"]["round"],
        "val_auc": summary["best"]["val"].get("auc"),
        "test_auc": summary["best"]["test"]["auc"],
        "final_round_test_auc": (last.get("test") or {}).get("auc"),
        "wall_s": summary["wall_s"],
        "ledger": _ledger_figures(state_dir),
        "command": "medfed " + " ".join(["simulate", "--run-dir", f"runs/{name}-{label}", *common, *extra]),
    }
    logger.info("  -> round %s, test AUC %.4f, evaluation share %s", result["best_round"], result["test_auc"],
                result["ledger"]["share_mean"])
    return result


def bench(name: str, data_dir: Path, work: Path, quick: bool, repeats: int) -> dict[str, Any]:
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else RECIPES[name]
    common = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION, *recipe,
              "privacy=dp", f"privacy.target_epsilon={EPSILON:g}", *DP_FIXED]
    exact = _run(name, "exact", common, ["privacy.exact_metrics=true"], work)
    noised = [_run(name, f"noised-{i + 1}", common, [], work) for i in range(repeats)]
    mean_auc = statistics.mean(r["test_auc"] for r in noised)
    return {"exact": exact, "noised": noised, "noised_test_auc_mean": mean_auc,
            "gap": exact["test_auc"] - mean_auc, "floor_met": exact["test_auc"] - mean_auc <= FLOOR}


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: dict[str, Any], total: float, command: str) -> str:
    lines = [START, "", f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform} (2 CPU cores, no GPU), in "
             f"{total / 60:.0f} min, by `{command}`. Epsilon {EPSILON:g} per hospital (delta 1e-5), 5 hospitals, "
             "Dirichlet(0.5), seed 0, the recipes of the privacy table above. *exact*: `privacy.exact_metrics=true` "
             "(metrics, loss and counts released exactly, as before metering); *noised*: the default, each a fresh "
             "draw of the noise. Test AUC at the round selected on validation data (noised: the one-standard-error "
             "rule). The privacy table above was measured before metering: its epsilon-8 rows are the *exact* "
             "rows here.", "",
             "| dataset | evaluation | selected round | val AUC | test AUC | last round's test AUC | max epsilon "
             "| evaluations' share of epsilon | training noise | evaluation noise |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label, run in [("exact", r["exact"]), *[(f"noised #{i + 1}", x) for i, x in enumerate(r["noised"])]]:
            ledger = run["ledger"]
            noise = [s["train_noise"] for s in ledger["sites"] if s["train_noise"] is not None]
            evals = [s["eval_noise"] for s in ledger["sites"] if s["eval_noise"] is not None]
            lines.append(
                f"| {name} | {label} | {run['best_round']} | {_f(run['val_auc'])} | {_f(run['test_auc'])} | "
                f"{_f(run['final_round_test_auc'])} | {_f(ledger['epsilon_max'], 3)} | "
                f"{_f(ledger['share_mean'], 3) if evals else '-'} | {_f(statistics.mean(noise), 3) if noise else '-'} "
                f"| {_f(evals[0], 2) if evals else '-'} |")
    lines += ["", "| dataset | exact test AUC | noised test AUC (mean) | gap | floor (gap <= 0.01) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_f(r['exact']['test_auc'])} | {_f(r['noised_test_auc_mean'])} | "
                     f"{r['gap']:+.4f} | {'met' if r['floor_met'] else 'NOT met'} |")
    lines += ["", "Commands of each run: benchmarks/results/metered_evaluation.json.", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "bench-metered", list(RECIPES))
    parser.add_argument("--repeats", type=int, default=3, help="noised runs per dataset (fresh noise each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {name: bench(name, args.data_dir.resolve(), args.work.resolve(), args.quick, args.repeats)
               for name in args.datasets}
    total = time.time() - started
    command = "python benchmarks/metered_evaluation.py --data-dir ../shared/data/medmnist" + (
        " --quick" if args.quick else "")
    section = render(results, total, command)
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=START, end=END, heading="Privacy: metered evaluation (the cost of "
                  "noising every number that leaves)")
        out = REPO / "benchmarks" / "results" / "metered_evaluation.json"
        out.write_text(json.dumps({"results": results, "total_s": total, "measured": time.strftime("%Y-%m-%d")},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
