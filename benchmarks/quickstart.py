"""Benchmark: the README quickstart as written, with the default recipe, beside its two baselines.

The federation of the README (5 hospitals, Dirichlet(0.5) label skew, seed 0) with `train.rounds=20` and nothing
else: the default recipe (`train.local_steps` optimizer steps per round at every hospital, warm-up, AdamW), on
PneumoniaMNIST and BreastMNIST, against the centralized baseline of the same config (the pooled data, as many steps
per round as all hospitals together) and the local-only baseline. Test AUC at the best-*validation* round.

    python benchmarks/quickstart.py                # ~20 min on 2 cores
    python benchmarks/quickstart.py --quick        # a smoke run of the script

Writes docs/benchmarks.md (between the `quickstart` markers) and benchmarks/results/quickstart.json.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import bench_dataset, measured, method_cells, per_dataset  # noqa: E402

logger = logging.getLogger("benchmarks.quickstart")

START, END = "<!-- quickstart:start -->", "<!-- quickstart:end -->"
RECIPE = ["train.rounds=20"]  # the README's command: everything else is the default recipe


def floors(name: str, r: dict[str, Any]) -> list[tuple[str, bool]]:
    """Issue 26's floors for the quickstart as (text, passed)."""
    fed, cen = r["fedavg"]["test_auc"], r["centralized"]["test_auc"]
    if name == "pneumoniamnist":
        return [(f"FedAvg AUC {fed:.4f} >= 0.99 x centralized {cen:.4f} = {0.99 * cen:.4f}", fed >= 0.99 * cen),
                (f"FedAvg AUC {fed:.4f} >= 0.944 (published ResNet-18, 28 px)", fed >= 0.944)]
    if name == "breastmnist":
        return [(f"FedAvg AUC {fed:.4f} >= 0.95 x centralized {cen:.4f} = {0.95 * cen:.4f}", fed >= 0.95 * cen)]
    return []


def render(results: dict[str, Any], total_s: float, command: str) -> str:
    lines = [
        START,
        *measured(total_s, command),
        "The README quickstart as written: 5 hospitals, Dirichlet(alpha=0.5), seed 0, `train.rounds=20`, every other "
        "value the default (smallcnn, AdamW lr 1e-3, batch 32, 50 local steps per round, one round of warm-up). "
        "Test AUC/ACC at the best-validation round (local-only: mean and min-max over the hospitals' own models).",
        "",
        "| dataset | method | test AUC | test ACC | best round | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for method, auc, acc, best, m in method_cells(r):
            lines.append(f"| {name} | {method} | {auc} | {acc} | {best} | {m['wall_s']:.1f} |")
    lines += ["", "Floors (issue 26):", ""]
    for name, r in results.items():
        for text, ok in floors(name, r):
            lines.append(f"- {name}: {text} — {'PASS' if ok else 'FAIL'}")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    per_dataset(__doc__, "quickstart", lambda name, data, work, quick: bench_dataset(name, data, work, quick, RECIPE),
                render, start=START, end=END,
                heading="Quickstart with the default recipe: FedAvg vs centralized vs local-only")


if __name__ == "__main__":
    main()
