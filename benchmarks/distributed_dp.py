"""Benchmark: distributed DP (issue 20): `privacy=distributed_dp` against local DP and pooled DP-SGD.

5 hospitals, Dirichlet(0.5), seed 0 (the federation of benchmarks/privacy.py), `model=scatternet` (the DP model of
issue 19) and the same 20 rounds everywhere, at target epsilon 8, 3 and 1 (delta 1e-5). Rows:

- `privacy=dp`: every hospital adds all the noise its own epsilon needs (Opacus DP-SGD, the head DP recipe);
- `privacy=distributed_dp`: the defaults (sampling rate 1, max_dropouts 0, max_colluding 0, metered evaluations
  taking privacy.eval_share of the target);
- `privacy=distributed_dp privacy.exact_metrics=true`: the same with every bit of epsilon on training and exact
  validation (research only: the hospitals' validation statistics then leave unnoised), the like-for-like of
- pooled DP-SGD: `medfed baseline centralized privacy=dp` (Opacus on the union of the data, the upper reference;
  its validation is exact).

Test AUC at the best-*validation* round (metered runs: the coordinator's metrics from the hospitals' noised
statistics), and at the last round. Bytes: a real 3-hospital deployment per mode (synthetic task, `model=scatternet`,
2 rounds), the bytes each hospital's audit log records for its train replies (SecAgg+'s four stages), per round:
`privacy=distributed_dp` against plain SecAgg+ (`privacy.secure_aggregation=true`).

    python benchmarks/distributed_dp.py --data-dir ../shared/data/medmnist          # ~35 min on 2 cores
    python benchmarks/distributed_dp.py --data-dir ../shared/data/medmnist --quick  # a smoke run of the script

Writes docs/benchmarks.md (between the `distributed-dp` markers) and benchmarks/results/distributed_dp.json.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import FEDERATION, TRAINED_NOWHERE, benchmark_parser, require_medmnist, run_medfed, write_doc
from deployment import run_deployment

logger = logging.getLogger("benchmarks.distributed_dp")

START, END = "<!-- distributed-dp:start -->", "<!-- distributed-dp:end -->"
DATASETS = ["breastmnist", "pneumoniamnist"]
EPSILONS = [8.0, 3.0, 1.0]
MODES: dict[str, tuple[str, list[str]]] = {  # row -> (medfed command, privacy overrides)
    "local DP (privacy=dp)": ("simulate", ["privacy=dp"]),
    "distributed DP (defaults)": ("simulate", ["privacy=distributed_dp"]),
    "distributed DP, exact validation": ("simulate", ["privacy=distributed_dp", "privacy.exact_metrics=true"]),
    "pooled DP-SGD (baseline centralized)": ("baseline", ["privacy=dp"]),
}
# floors of issue 20 (test AUC at epsilon 1) and the gap to the pooled reference
FLOORS = {"breastmnist": 0.78, "pneumoniamnist": 0.94}
GAP = 0.01
BYTES_RECIPE = ["dataset=synthetic", "dataset.n_train=300", "dataset.n_test=100", "federation.hospitals=3",
                "model=scatternet", "train.rounds=2", "strategy.min_available_nodes=3"]


def _run(name: str, mode: str, epsilon: float, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    command, privacy = MODES[mode]
    run_dir = work / f"{name}-{mode.split()[0]}-{mode.count(',')}-{command}-eps{epsilon:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*(["simulate"] if command == "simulate" else ["baseline", "centralized"]), "--run-dir", str(run_dir),
            "--cache-dir", str(work / "cache"), "dataset=medmnist", f"dataset.name={name}",
            f"dataset.data_path={data_dir}", *FEDERATION, "model=scatternet", *privacy,
            f"privacy.target_epsilon={epsilon:g}", "train.rounds=20"]
    if command == "simulate":
        args[1:1] = ["--state-dir", str(work / f"state-{run_dir.name}")]  # a fresh ledger per run
    if quick:
        args.append("train.rounds=2")
    logger.info("%s eps %g: medfed %s", mode, epsilon, " ".join(args))
    code, wall, out = run_medfed(args, cwd=REPO, timeout=3600)
    if code not in (0, TRAINED_NOWHERE):
        raise SystemExit(f"{mode} on {name} at epsilon {epsilon:g} failed (exit {code}):\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = summary.get("best") or {}
    return {
        "test_auc": (best.get("test") or {}).get("auc"), "best_round": best.get("round"),
        "last_test_auc": (lines[-1].get("test") or {}).get("auc") if lines else None,
        "max_epsilon": (summary.get("privacy") or {}).get("max_epsilon"),
        "noise_multiplier": ((summary.get("privacy") or {}).get("assumptions") or {}).get("noise_multiplier"),
        "wall_s": wall, "command": "medfed " + " ".join(a for a in args if not a.startswith(str(work))),
    }


def bench(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    return {f"{epsilon:g}": {mode: _run(name, mode, epsilon, data_dir, work, quick) for mode in MODES}
            for epsilon in EPSILONS}


def bench_bytes(work: Path) -> dict[str, Any]:
    """Bytes per hospital per round of train replies in a real deployment, distributed DP against plain SecAgg+."""
    from medfed.client.gate import read_audit

    out: dict[str, Any] = {}
    for label, privacy in (("plain SecAgg+", ["privacy.secure_aggregation=true"]),
                           ("distributed DP", ["privacy=distributed_dp", "privacy.target_epsilon=8"])):
        folder = work / ("bytes-" + label.split()[0])
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        run_dir, _ = run_deployment(folder, [*BYTES_RECIPE, *privacy], hospitals=3)
        rounds = len((run_dir / "metrics.jsonl").read_text().splitlines())
        per_site = []
        for index in range(3):
            sent = [e for e in read_audit(folder / f"site-{index}" / "state")
                    if e["event"] == "sent" and e["type"] == "train" and e["error"] is None]
            per_site.append(sum(int(e["bytes"]) for e in sent) / max(1, rounds))
        out[label] = {"bytes_per_round": statistics.mean(per_site), "rounds": rounds,
                      "recipe": " ".join([*BYTES_RECIPE, *privacy])}
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: dict[str, Any], sent: dict[str, Any], total_s: float, command: str) -> str:
    lines = [
        START,
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, 2 cores, no GPU; whole script "
        f"{total_s / 60:.1f} min. Reproduce with:", "", f"    {command}", "",
        "5 hospitals, Dirichlet(0.5), seed 0, `model=scatternet`, 20 rounds, delta 1e-5. Test AUC at the round "
        "chosen on validation (in brackets: at the last round). Under `privacy=dp` and the distributed-DP defaults "
        "the validation metrics are the coordinator's, from the hospitals' noised statistics (they take "
        "`privacy.eval_share` = 0.25 of the target); the pooled reference and the exact-validation row select on "
        "exact validation and spend all of epsilon on training.", "",
    ]
    for name, by_eps in results.items():
        lines += [f"**{name}**", "", "| test AUC | " + " | ".join(f"epsilon {e}" for e in by_eps) + " |",
                  "|---|" + "---|" * len(by_eps)]
        for mode in MODES:
            cells = [f"{_fmt(by_eps[e][mode]['test_auc'])} ({_fmt(by_eps[e][mode]['last_test_auc'])})"
                     for e in by_eps]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        noise = [_fmt(by_eps[e]["distributed DP (defaults)"]["noise_multiplier"], 2) for e in by_eps]
        lines += ["", "Noise multiplier of the distributed sum (defaults): " + ", ".join(
            f"epsilon {e}: {z}" for e, z in zip(by_eps, noise, strict=True)) + "."]
        verdicts = []
        for e in by_eps:
            ours = by_eps[e]["distributed DP (defaults)"]["test_auc"]
            pooled = by_eps[e]["pooled DP-SGD (baseline centralized)"]["test_auc"]
            if ours is not None and pooled is not None:
                verdicts.append(f"epsilon {e}: {ours - pooled:+.3f} against pooled "
                                f"({'within' if ours >= pooled - GAP else 'NOT within'} {GAP})")
        floor_at_1 = by_eps.get("1", {}).get("distributed DP (defaults)", {}).get("test_auc")
        if floor_at_1 is not None:
            verdicts.append(f"floor at epsilon 1: {_fmt(floor_at_1)} against {FLOORS[name]} "
                            f"({'met' if floor_at_1 >= FLOORS[name] else 'NOT met'})")
        lines += ["", "Issue 20's floors (defaults): " + "; ".join(verdicts) + ".", ""]
    if sent:
        plain, ours = sent["plain SecAgg+"], sent["distributed DP"]
        lines += [
            "Bytes each hospital sends in its train replies per round (SecAgg+'s four stages: keys, shares, the "
            "masked vector, unmasking shares), from the hospitals' audit logs in a real 3-hospital deployment "
            f"(`{plain['recipe']}` against `{ours['recipe']}`):", "",
            "| | bytes per hospital per round |", "|---|---|",
            f"| plain SecAgg+ (FedAvg of the weights) | {plain['bytes_per_round']:.0f} |",
            f"| distributed DP (integer gradient sum of the trainable weights) | {ours['bytes_per_round']:.0f} |",
        ]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "bench-distributed-dp", DATASETS)
    parser.add_argument("--skip-bytes", action="store_true", help="no deployments (the byte table is left out)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {name: bench(name, args.data_dir.resolve(), args.work.resolve(), args.quick) for name in args.datasets}
    sent: dict[str, Any] = {}
    if not args.skip_bytes:
        with tempfile.TemporaryDirectory(prefix="medfed-bench-ddp-") as tmp:
            sent = bench_bytes(Path(tmp))
    total = time.time() - started
    command = ("python benchmarks/distributed_dp.py --data-dir ../shared/data/medmnist"
               + (" --quick" if args.quick else "") + (" --skip-bytes" if args.skip_bytes else ""))
    section = render(results, sent, total, command)
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=START, end=END, heading="Distributed DP: noise shared under SecAgg+")
        (REPO / "benchmarks" / "results" / "distributed_dp.json").write_text(json.dumps(
            {"results": results, "bytes": sent, "total_s": total, "measured": time.strftime("%Y-%m-%d")},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
