"""Benchmark: the README's self-supervised commands as written, at 10 % labels, against scratch (issue 26).

For each dataset, the README quickstart's federation (5 hospitals, Dirichlet 0.5, seed 0) and no recipe overrides:
1. `medfed simulate task=ssl ssl.method=simclr` (federated SimCLR pretraining with its defaults),
2. `medfed simulate model.pretrained=RUN/best_model.pt dataset.label_fraction=0.1` (fine-tuning, default recipe),
3. `medfed simulate dataset.label_fraction=0.1` (the same from scratch).
Test AUC at each run's best-*validation* round.

    python benchmarks/ssl_defaults.py            # ~15 min on 2 cores
    python benchmarks/ssl_defaults.py --quick    # a smoke run of the script

Writes docs/benchmarks.md (between the `ssl-defaults` markers) and benchmarks/results/ssl_defaults.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import REPO, measured, per_dataset, run_medfed  # noqa: E402

logger = logging.getLogger("benchmarks.ssl_defaults")

START, END = "<!-- ssl-defaults:start -->", "<!-- ssl-defaults:end -->"
FEDERATION = ["federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5", "federation.seed=0"]
GAIN = {"pneumoniamnist": 0.01, "breastmnist": 0.03}  # issue 26's floors over scratch at 10 % labels


def _run(name: str, args: list[str], work: Path, quick: bool) -> dict[str, Any]:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ["train.rounds=1", "train.local_steps=2"] if quick else []
    command = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), *args, *extra]
    logger.info("%s: medfed %s", name, " ".join(command))
    code, seconds, out = run_medfed(command, cwd=REPO, timeout=7200)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}):\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]
    row = {"val_auc": best["val"].get("auc"), "val_loss": best["val"].get("loss"),
           "test_auc": (best.get("test") or {}).get("auc"), "best_round": best.get("round"), "wall_s": seconds,
           "command": "medfed " + " ".join(["simulate", "--run-dir", f"runs/{name}", *args])}
    logger.info("  -> val %s test %s", row["val_auc"], row["test_auc"])
    return row


def bench(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    data = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION]
    ssl = _run(f"{name}-simclr", [*data, "task=ssl", "ssl.method=simclr"], work, quick)
    weights = work / f"{name}-simclr" / "best_model.pt"
    tuned = _run(f"{name}-simclr-10pct", [*data, f"model.pretrained={weights}", "dataset.label_fraction=0.1"], work,
                 quick)
    scratch = _run(f"{name}-scratch-10pct", [*data, "dataset.label_fraction=0.1"], work, quick)
    return {"pretrain": ssl, "simclr": tuned, "scratch": scratch}


def render(results: dict[str, Any], total_s: float, command: str) -> str:
    lines = [START, *measured(total_s, command),
             "5 hospitals, Dirichlet(alpha=0.5), seed 0, no recipe overrides: SimCLR pretraining with its defaults "
             "(`task=ssl`: batch 128, lr 3e-3, 10 rounds of 50 local steps), then the default recipe (5 rounds) at "
             "10 % labels from its encoder or from scratch. Test AUC at the best-validation round.",
             "", "| dataset | start | val AUC | test AUC | best round | wall s |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["pretrain"]
        loss = "-" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
        lines.append(f"| {name} | SimCLR pretraining (val pretext loss {loss}) | - | - | "
                     f"{p['best_round']} | {p['wall_s']:.0f} |")
        for start in ("scratch", "simclr"):
            m = r[start]
            lines.append(f"| {name} | {start}, 10 % labels | {m['val_auc']:.4f} | {m['test_auc']:.4f} | "
                         f"{m['best_round']} | {m['wall_s']:.0f} |")
    lines += ["", "Floors (issue 26):", ""]
    for name, r in results.items():
        gain, floor = r["simclr"]["test_auc"] - r["scratch"]["test_auc"], GAIN.get(name)
        if floor is not None:
            lines.append(f"- {name}: SimCLR {r['simclr']['test_auc']:.4f} - scratch {r['scratch']['test_auc']:.4f} "
                         f"= {gain:+.4f} >= +{floor} — {'PASS' if gain >= floor else 'FAIL'}")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    per_dataset(__doc__, "ssl_defaults", bench, render, start=START, end=END,
                heading="Self-supervised pretraining with its defaults: SimCLR vs scratch at 10 % labels")


if __name__ == "__main__":
    main()
