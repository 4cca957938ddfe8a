"""Benchmark: calibration, uncertainty and active learning on PneumoniaMNIST and BreastMNIST.

1. **Calibration and uncertainty of a federated run** (5 hospitals, Dirichlet(0.5), the baselines' recipe, with
   ``model.dropout=0.2``): `medfed simulate ... evaluate.mc_samples=20 evaluate.snapshots=3
   evaluate.gradcam_samples=4`, then `medfed report`. Reported: the temperature fitted on the hospitals'
   validation splits, validation and test ECE before/after it, and for each variant (model, calibrated, MC dropout,
   snapshot ensemble) the test AUC, ECE, NLL and the AUC on the cases kept when the most uncertain 10 % / 20 % are
   referred to a human.
2. **Active learning at each site**: each of the 5 hospitals starts with a few labelled training images
   (stratified), trains the model from the same initial weights, ranks its unlabelled pool by predictive entropy
   (or randomly), reveals the top images' labels, retrains; the test AUC per step, mean over hospitals and seeds.

    python benchmarks/trust.py            # ~25 min on 2 cores
    python benchmarks/trust.py --quick    # checks the script, not the figures

Writes docs/benchmarks.md (between the `trust` markers) and benchmarks/results/trust.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import FEDERATION, RECIPES, benchmark_parser, require_medmnist, run_medfed, write_doc  # noqa: E402

logger = logging.getLogger("benchmarks.trust")
START, END = "<!-- trust:start -->", "<!-- trust:end -->"
# active learning per dataset: (initial labelled, labelled per step, steps, epochs per training)
AL_SETTINGS = {"pneumoniamnist": (50, 50, 4, 15), "breastmnist": (20, 10, 4, 30)}
AL_SEEDS = (0, 1, 2)


def federated_run(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else RECIPES[name]
    args = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION, *recipe,
            "model.dropout=0.2", "evaluate.mc_samples=20", "evaluate.snapshots=3", "evaluate.gradcam_samples=4"]
    run_dir = work / f"{name}-trust"
    subprocess_args = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"),
                       "--state-dir", str(work / "state"), *args]
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    code, seconds, out = run_medfed(subprocess_args, cwd=REPO, timeout=3600)
    if code != 0:
        raise SystemExit(f"medfed simulate failed on {name}:\n{out[-3000:]}")
    code, _, out = run_medfed(["report", str(run_dir)], cwd=REPO, timeout=600)
    if code != 0:
        raise SystemExit(f"medfed report failed on {name}:\n{out[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"overrides": args, "wall_s": seconds, "calibration": summary["calibration"],
            "uncertainty": summary["uncertainty"], "best": summary["best"], "run_dir": str(run_dir)}


def active_learning(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    from medfed.client.active_learning import active_learning_curve, cnn_learner
    from medfed.client.site import load_site
    from medfed.common.config import compose_config
    from medfed.common.data import load_test_set

    initial, per_step, steps, epochs = (20, 10, 1, 2) if quick else AL_SETTINGS[name]
    cfg = compose_config(["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION])
    info, test = load_test_set(cfg, cache_dir=work / "cache")
    curves: dict[str, list[list[float]]] = {"entropy": [], "random": []}
    started = time.time()
    skipped: list[str] = []
    for index in range(cfg.federation.hospitals):
        site = load_site(cfg, index, cache_dir=work / "cache")
        if len(site.train) < initial + per_step * steps:  # Dirichlet skew leaves some hospitals very few images
            skipped.append(f"hospital-{index} ({len(site.train)} training images)")
            continue
        for seed in AL_SEEDS[:1] if quick else AL_SEEDS:
            learner = cnn_learner(site.train, test, cfg.model, cfg.train, n_classes=info.n_classes,
                                  spatial_dims=info.spatial_dims, epochs=epochs, seed=seed)
            for method in curves:
                curve = active_learning_curve(site.train.labels, learner, method=method, initial=initial,
                                              per_step=per_step, steps=steps, seed=seed)
                curves[method].append([c["auc"] for c in curve])
        logger.info("%s active learning: hospital %d done (%.0f s)", name, index, time.time() - started)
    entropy, random = np.asarray(curves["entropy"]), np.asarray(curves["random"])
    return {
        "settings": {"initial": initial, "per_step": per_step, "steps": steps, "epochs": epochs,
                     "seeds": list(AL_SEEDS[:1] if quick else AL_SEEDS), "hospitals": cfg.federation.hospitals},
        "labelled": [initial + per_step * s for s in range(steps + 1)],
        "entropy": np.nanmean(entropy, axis=0).tolist(),
        "random": np.nanmean(random, axis=0).tolist(),
        "wins_final": int(np.sum(entropy[:, -1] > random[:, -1])),
        "runs": int(entropy.shape[0]),
        "skipped": skipped,
        "seconds": time.time() - started,
    }


def _f(value: Any) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4f}"


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [START, "", f"`{command}` ({results['date']}, {results['machine']}; one seed per federated run).", ""]
    lines += ["Federated run (5 hospitals, Dirichlet 0.5, model.dropout=0.2), selected model on the test set:", "",
              "| dataset | T | val ECE before -> after | variant | test AUC | ECE | NLL | acc | acc, 10 % referred | "
              "acc, 20 % referred | AUC, 20 % referred |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, part in results["datasets"].items():
        fed = part["federated"]
        cal = fed["calibration"]
        val = cal.get("val") or {}
        first = True
        for variant, data in fed["uncertainty"]["test"].items():
            m = data["metrics"]
            refer = {r["refer"]: r for r in data["referral"]}
            head = (f"| {name} | {cal['temperature']:.3f} | {_f(val.get('ece_before'))} -> {_f(val.get('ece_after'))} "
                    if first else "| | | ")
            lines.append(head + f"| {variant} | {_f(m['auc'])} | {_f(m['ece'])} | {_f(m['loss'])} | {_f(m['acc'])} | "
                         f"{_f(refer[0.1]['acc'])} | {_f(refer[0.2]['acc'])} | {_f(refer[0.2]['auc'])} |")
            first = False
    lines += ["", "Active learning at each hospital (test AUC, mean over hospitals x seeds; entropy vs random):", ""]
    for name, part in results["datasets"].items():
        al = part["active_learning"]
        skipped = f"; too small for the schedule: {', '.join(al['skipped'])}" if al["skipped"] else ""
        lines.append(f"{name} ({al['runs']} runs, {al['settings']['epochs']} epochs per training, "
                     f"entropy ahead at the last step in {al['wins_final']}/{al['runs']}{skipped}):")
        lines.append("")
        lines.append("| labelled | " + " | ".join(str(n) for n in al["labelled"]) + " |")
        lines.append("|---|" + "---|" * len(al["labelled"]))
        for method in ("entropy", "random"):
            lines.append(f"| {method} | " + " | ".join(_f(v) for v in al[method]) + " |")
        gain = np.asarray(al["entropy"]) - np.asarray(al["random"])
        lines.append("| gain | " + " | ".join(f"{v:+.4f}" for v in gain) + " |")
        lines.append("")
    lines += [END]
    return "\n".join(lines)


def main() -> None:
    import platform

    args = benchmark_parser(__doc__, "trust", list(RECIPES)).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                               f"{__import__('os').cpu_count()} cores, CPU", "datasets": {}}
    for name in args.datasets:
        logger.info("%s: federated run with calibration and uncertainty", name)
        results["datasets"][name] = {"federated": federated_run(name, args.data_dir, args.work, args.quick)}
        logger.info("%s: active learning", name)
        results["datasets"][name]["active_learning"] = active_learning(name, args.data_dir, args.work, args.quick)
    command = "python benchmarks/trust.py" + (" --quick" if args.quick else "")
    text = markdown(results, command)
    print(text)
    if not args.quick:
        out = REPO / "benchmarks" / "results" / "trust.json"
        out.write_text(json.dumps(results, indent=1, default=float) + "\n")
        write_doc(text, args.doc, start=START, end=END,
                  heading="Trustworthy outputs: calibration, uncertainty, active learning")


if __name__ == "__main__":
    main()
