"""Benchmark: what sample-level DP costs. Test AUC at epsilon 1, 3, 8 and inf per hospital, and DP step time.

Part 1, utility: 5 hospitals, Dirichlet(0.5), seed 0, FedAvg without DP (epsilon inf) and with `privacy=dp` at
target epsilon 1, 3 and 8 per hospital (delta 1e-5), same recipe for all four, side by side in one run. Test AUC is
read at the best-*validation* round. Every run gets a fresh state directory: each stands for a separate federation
(with one shared ledger the later runs would find the budget spent, which is the point of the ledger).

Part 2, speed: the time of one optimizer step (batch 32, 28 px grey, 2 classes) with DP (Opacus, Poisson sampling,
clipping, noise) and without, for every registered model and each grad-sample mode; in-process, median of repeats.

    python benchmarks/privacy.py --data-dir ../shared/data/medmnist          # ~15 min on 2 cores
    python benchmarks/privacy.py --data-dir ../shared/data/medmnist --quick  # a smoke run of the script
    python benchmarks/privacy.py --skip-utility  # step times only; the utility table is kept from the last full run

Writes the results into docs/benchmarks.md (between the `privacy` markers) and benchmarks/results/privacy.json.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# benchmarks/ is the script's folder
from baselines import FEDERATION, TRAINED_NOWHERE, benchmark_parser, run_medfed, write_doc  # noqa: E402

logger = logging.getLogger("benchmarks.privacy")

START, END = "<!-- privacy:start -->", "<!-- privacy:end -->"
EPSILONS: list[float | None] = [None, 8.0, 3.0, 1.0]  # None = no DP (epsilon inf)
# One recipe per dataset for all four runs. PneumoniaMNIST's was picked by the best federated *validation* AUC of
# the epsilon-8 run among eight candidates (see docs/benchmarks.md); BreastMNIST's was set once, not tuned.
RECIPES: dict[str, list[str]] = {
    "pneumoniamnist": ["train.rounds=20", "train.local_epochs=1", "train.batch_size=128", "train.optimizer=sgd",
                       "train.lr=0.05", "train.lr_schedule=cosine"],
    "breastmnist": ["train.rounds=30", "train.local_epochs=5", "train.batch_size=32"],
}
DP_FIXED = ["privacy.delta=1e-5", "privacy.max_grad_norm=1.0", "federation.site_max_delta=1e-5"]


def dp_run_row(summary: dict[str, Any]) -> dict[str, Any]:
    """A DP run's row from its summary.json: test AUC/ACC at the best-validation round, epsilon, refusals, time."""
    return {
        "test_auc": summary["best"]["test"]["auc"],
        "test_acc": summary["best"]["test"]["acc"],
        "best_round": summary["best"]["round"],
        "max_epsilon": (summary.get("privacy") or {}).get("max_epsilon"),
        "site_epsilons": {k: v.get("epsilon") for k, v in summary["sites"].items()},
        "dropped": summary["dropped"],
        "stopped": summary.get("stopped"),
        "rounds_done": summary["rounds"],
        "wall_s": summary["wall_s"],
    }


def bench_utility(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else RECIPES[name]
    common = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION, *recipe]
    results: dict[str, Any] = {"overrides": common, "runs": {}}
    for eps in EPSILONS:
        label = "inf" if eps is None else f"{eps:g}"
        privacy = [] if eps is None else ["privacy=dp", f"privacy.target_epsilon={eps}", *DP_FIXED]
        run_dir, state_dir = work / f"{name}-eps{label}", work / f"{name}-eps{label}-state"
        for path in (run_dir, state_dir):
            shutil.rmtree(path, ignore_errors=True)
        args = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), "--state-dir",
                str(state_dir), *common, *privacy]
        logger.info("%s epsilon %s: medfed %s", name, label, " ".join(args))
        code, wall, out = run_medfed(args, cwd=REPO, timeout=3600)
        # a run that trained nowhere (every hospital refused) is a row too
        if code not in (0, TRAINED_NOWHERE) or not (run_dir / "summary.json").is_file():
            raise SystemExit(f"{name} epsilon {label} failed (exit {code}):\n{out[-4000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        results["runs"][label] = {
            **dp_run_row(summary),
            "command": "medfed " + " ".join(["simulate", "--run-dir", f"runs/{name}-eps{label}", *common, *privacy]),
        }
        logger.info("  -> test AUC %.4f, max epsilon %s", summary["best"]["test"]["auc"],
                    results["runs"][label]["max_epsilon"])
    return results


SPEED_REPEATS = 7


def _step_seconds(model_name: str, mode: str | None, repeats: int, *, warm_up: bool = True) -> list[float]:
    """Seconds per optimizer step of ``train_epochs`` (mode None: no DP), one value per repeat; with ``warm_up``
    a first call (imports, allocations) is not counted."""
    import numpy as np

    from medfed.client.training import DPTraining, configure_threads, train_epochs
    from medfed.common.config import DPConfig, ModelConfig, TrainConfig
    from medfed.common.data import ArrayDataset
    from medfed.common.models import build_model

    configure_threads(0, 1)
    rng = np.random.default_rng(0)
    n = 32 * 16  # 16 batches of 32 per timed call (set-up amortised: a steady-state step time)
    data = ArrayDataset(images=rng.normal(size=(n, 1, 28, 28)).astype(np.float32),
                        labels=rng.integers(0, 2, size=n).astype(np.int64))
    cfg = TrainConfig(batch_size=32)
    times = []
    for i in range(repeats + int(warm_up)):
        model = build_model(ModelConfig(name=model_name), spatial_dims=2, in_channels=1, n_classes=2)
        privacy = None if mode is None else DPTraining(  # the default DP config's memory limit, as users run it
            1.0, 1.0, max_physical_batch_size=DPConfig().max_physical_batch_size, grad_sample_mode=mode)
        result = train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=i, privacy=privacy)
        if i >= int(warm_up):
            times.append(result.seconds / result.steps)
    return times


def bench_speed(quick: bool) -> dict[str, dict[str, float]]:
    """Per model and grad-sample mode: median step times and the median of per-repeat DP/non-DP ratios. Each
    repeat times a non-DP call and a DP call back to back, so slow drifts of a shared machine cancel out."""
    from medfed.common.config import GRAD_SAMPLE_MODES
    from medfed.common.models import available_models

    repeats = 1 if quick else SPEED_REPEATS
    out: dict[str, dict[str, float]] = {}
    for model_name in available_models():
        out[model_name] = {}
        for mode in GRAD_SAMPLE_MODES:
            _step_seconds(model_name, None, 0), _step_seconds(model_name, mode, 0)  # warm-up of both paths
            pairs = [(_step_seconds(model_name, None, 1, warm_up=False)[0],
                      _step_seconds(model_name, mode, 1, warm_up=False)[0]) for _ in range(repeats)]
            plain, dp = statistics.median(p for p, _ in pairs), statistics.median(d for _, d in pairs)
            ratio = statistics.median(d / p for p, d in pairs)
            out[model_name].setdefault("plain_s", plain)
            out[model_name][f"{mode}_s"], out[model_name][f"{mode}_ratio"] = dp, ratio
            logger.info("%s: plain %.4f s/step, DP %s %.4f s/step (x%.2f)", model_name, plain, mode, dp, ratio)
    return out


def render(
    utility: dict[str, Any], speed: dict[str, dict[str, float]], total_s: float, command: str,
    utility_measured: str | None = None,
) -> str:
    from medfed.common.config import DPConfig, GRAD_SAMPLE_MODES

    default_mode = DPConfig().grad_sample_mode
    when = time.strftime("%Y-%m-%d")
    lines = [
        START,
        f"Measured {when} on {platform.machine()}, 2 cores, no GPU; whole script {total_s / 60:.1f} min. "
        + (f"Step times from `--skip-utility` on {when}; the utility table from the full run of {utility_measured}. "
           if utility_measured else "") + "Reproduce with:",
        "",
        f"    {command}",
        "",
        "5 hospitals, Dirichlet(0.5), seed 0, FedAvg, model `smallcnn`; DP: Opacus DP-SGD at every hospital, "
        "delta 1e-5, clipping norm 1.0, the noise derived per hospital from the target epsilon over the planned "
        "rounds and its data size. Test AUC at the best-validation round; epsilon = the largest cumulative "
        "epsilon any hospital reached.",
        "",
        "| dataset | recipe | target epsilon | test AUC | test ACC | best round | max epsilon spent | wall s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checks: list[tuple[str, bool | None]] = []
    for name, res in utility.items():
        recipe = " ".join(o for o in res["overrides"] if o.startswith("train."))
        for label, r in res["runs"].items():
            eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.3f}"
            note = (f"ended in round {r['rounds_done']}, which trained nowhere: {r['stopped']}"
                    if r.get("stopped") else (f"{r['dropped']} refusals/drops" if r["dropped"] else ""))
            lines.append(f"| {name} | {recipe} | {label} | {r['test_auc']:.4f} | {r['test_acc']:.4f} | "
                         f"{r['best_round']} | {eps} | {r['wall_s']:.1f} | {note} |")
        runs = res["runs"]
        for label, r in runs.items():
            if label != "inf" and r["max_epsilon"] is not None:
                checks.append((f"{name}: epsilon spent {r['max_epsilon']:.3f} <= target {label}",
                               r["max_epsilon"] <= float(label) + 1e-9))
        if name == "pneumoniamnist" and "8" in runs:
            dp8, plain = runs["8"]["test_auc"], runs["inf"]["test_auc"]
            checks.append((f"pneumoniamnist: AUC at epsilon 8 {dp8:.4f} >= 0.97 x non-DP {plain:.4f} = "
                           f"{0.97 * plain:.4f}", dp8 >= 0.97 * plain))
    lines += ["", "DP step time / non-DP step time (batch 32, 28 px grey, the default privacy.max_physical_batch_size; "
              f"DP and non-DP calls interleaved, median of {SPEED_REPEATS} ratios):", "",
              "| model | non-DP s/step | " + " | ".join(f"DP {m} s/step (ratio)" for m in GRAD_SAMPLE_MODES) + " |",
              "|---|---|" + "---|" * len(GRAD_SAMPLE_MODES)]
    for model_name, r in speed.items():
        cells = " | ".join(f"{r[f'{m}_s']:.4f} (x{r[f'{m}_ratio']:.2f})" for m in GRAD_SAMPLE_MODES)
        lines.append(f"| {model_name} | {r['plain_s']:.4f} | {cells} |")
    if "smallcnn" in speed:
        ratio = speed["smallcnn"][f"{default_mode}_ratio"]
        checks.append((f"default model smallcnn, default mode {default_mode}: DP/non-DP step time x{ratio:.2f} <= 2.0",
                       ratio <= 2.0))
    lines += ["", "Floors:", ""]
    for text, ok in checks:
        lines.append(f"- {text} — {'PASS' if ok else 'FAIL'}")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "bench-privacy", list(RECIPES))
    parser.add_argument("--skip-utility", action="store_true", help="only the step-time part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    speed = bench_speed(args.quick)
    out_json = REPO / "benchmarks" / "results" / "privacy.json"
    kept: dict[str, Any] = {}
    if args.skip_utility and out_json.is_file():
        kept = json.loads(out_json.read_text())
    utility = kept.get("utility", {}) if args.skip_utility else {
        name: bench_utility(name, args.data_dir.resolve(), args.work.resolve(), args.quick) for name in args.datasets
    }
    total = time.time() - started
    command = "python benchmarks/privacy.py --data-dir ../shared/data/medmnist" + (" --quick" if args.quick else "")
    measured = kept.get("utility_measured", "an earlier date") if args.skip_utility else None
    section = render(utility, speed, total, command, utility_measured=measured)
    print(section)
    if not args.quick and (utility or not args.skip_utility):
        write_doc(section, args.doc, start=START, end=END, heading="Privacy: differential privacy at every hospital")
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({
            "utility": utility, "speed": speed, "total_s": total,
            "utility_measured": measured or time.strftime("%Y-%m-%d"),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
