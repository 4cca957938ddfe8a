"""Benchmark: which strategy to pick for heterogeneous hospitals, and what a poisoned hospital does to each.

Part 1, non-IID: PneumoniaMNIST and BreastMNIST, 5 hospitals, Dirichlet label skew alpha in {0.1, 0.5, 100}
(100 is close to IID), seed 0, one recipe per dataset for every method. Test AUC at the best-*validation* round of:
centralized (all hospitals' training images pooled; the pool does not depend on alpha, so it runs once, at 0.5),
local-only (each hospital alone, mean over hospitals), FedAvg, FedProx, FedAdam, FedYogi, FedMedian, and the
personalised variants: FedBN (normalisation layers kept at each hospital, selected on the hospitals' personalised
validation AUC), and local fine-tuning of the final model (2 epochs, epoch picked on each hospital's validation
split) after FedAvg and after FedBN. A personalised model belongs to one hospital: its test AUC is the mean over
the 5 hospitals' models on the global test set. The fine-tuned rows come from the FedAvg and FedBN runs (their wall
time includes the fine-tuning).

Part 2, poisoning (PneumoniaMNIST, alpha 0.5): hospital 0 sends global + 100 x its update (`scale`) or global +
N(0, 1) noise (`noise`) every round. Each strategy runs with medfed's update validation off
(`strategy.max_update_norm_ratio=0`), so what is measured is the aggregator's own robustness, against its clean
run; FedAvg also runs with the validation on (medfed's default), which rejects both attacks before aggregation.

    python benchmarks/strategies.py                 # ~45 min on 2 cores
    python benchmarks/strategies.py --quick         # a smoke run of the script (2 rounds)
    python benchmarks/strategies.py --reuse         # keep finished runs (their summary.json) from an earlier call

Writes docs/benchmarks.md (between the `strategies` markers) and benchmarks/results/strategies.json.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import benchmark_parser, require_medmnist, run_medfed, write_doc  # noqa: E402  (benchmarks/ is the script's folder)

logger = logging.getLogger("benchmarks.strategies")

START, END = "<!-- strategies:start -->", "<!-- strategies:end -->"
ALPHAS = [0.1, 0.5, 100.0]
# One recipe per dataset, set once (PneumoniaMNIST's is the privacy benchmark's at half the rounds), never tuned on
# test data.
RECIPES: dict[str, list[str]] = {
    "pneumoniamnist": ["train.rounds=10", "train.local_epochs=1", "train.batch_size=128", "train.optimizer=sgd",
                       "train.lr=0.05", "train.lr_schedule=cosine"],
    "breastmnist": ["train.rounds=15", "train.local_epochs=3", "train.batch_size=32"],
}
FINETUNE = ["personalize.finetune_epochs=2"]
# method -> (medfed command, overrides)
METHODS: dict[str, tuple[list[str], list[str]]] = {
    "centralized": (["baseline", "centralized"], []),
    "local": (["baseline", "local"], []),
    "fedavg": (["simulate"], ["strategy=fedavg", *FINETUNE]),
    "fedprox": (["simulate"], ["strategy=fedprox", "strategy.mu=0.01"]),
    "fedadam": (["simulate"], ["strategy=fedadam"]),
    "fedyogi": (["simulate"], ["strategy=fedyogi"]),
    "fedmedian": (["simulate"], ["strategy=fedmedian"]),
    "fedbn": (["simulate"], ["strategy=fedavg", "personalize.local_layers=norm", *FINETUNE]),
}
# rows of the table: (label, method whose run it comes from, which part of its summary)
ROWS = [
    ("centralized", "centralized", "best"), ("local-only", "local", "best"), ("FedAvg", "fedavg", "best"),
    ("FedProx (mu 0.01)", "fedprox", "best"), ("FedAdam", "fedadam", "best"), ("FedYogi", "fedyogi", "best"),
    ("FedMedian", "fedmedian", "best"), ("FedAvg + fine-tuning", "fedavg", "finetuned"),
    ("FedBN", "fedbn", "personalized"), ("FedBN + fine-tuning", "fedbn", "finetuned"),
]
POISON_DATASET, POISON_ALPHA = "pneumoniamnist", 0.5
ATTACKS = {"scale": ["federation.attack=scale", "federation.attack_scale=100"],
           "noise": ["federation.attack=noise", "federation.attack_scale=1"]}
ROBUST = {  # strategy label -> overrides (validation off: the aggregator alone)
    "FedAvg": ["strategy=fedavg"],
    "FedMedian": ["strategy=fedmedian"],
    "FedTrimmedAvg (beta 0.2)": ["strategy=fedtrimmedavg", "strategy.beta=0.2"],
    "Krum (f=1)": ["strategy=krum", "strategy.num_malicious_nodes=1"],
}
NO_VALIDATION = ["strategy.max_update_norm_ratio=0"]


def _test_auc(summary: dict[str, Any], part: str) -> float | None:
    entry = summary.get(part) or {}
    test = entry.get("test") or {}
    auc = test.get("auc")
    if isinstance(auc, dict):  # personalised parts: one model per hospital, the mean over hospitals
        auc = auc.get("mean")
    if part == "best" and summary.get("mode") == "local":
        auc = (summary.get("local") or {}).get("test_auc", {}).get("mean")
    return auc if isinstance(auc, (int, float)) and math.isfinite(auc) else None


def _run(label: str, command: list[str], overrides: list[str], work: Path, reuse: bool) -> dict[str, Any]:
    run_dir = work / label
    summary_path = run_dir / "summary.json"
    args = [*command, "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), *overrides]
    if not (reuse and summary_path.is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("%s: medfed %s", label, " ".join(args))
        code, _, out = run_medfed(args, cwd=REPO, timeout=3600)
        if code != 0:
            raise SystemExit(f"{label} failed (exit {code}):\n{out[-4000:]}")
    summary = json.loads(summary_path.read_text())
    return {"summary": summary, "wall_s": summary["wall_s"],
            "command": "medfed " + " ".join([*command, "--run-dir", f"runs/{label}", *overrides])}


def bench_noniid(name: str, data_dir: Path, work: Path, quick: bool, reuse: bool) -> dict[str, Any]:
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else RECIPES[name]
    data = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}"]
    results: dict[str, Any] = {"recipe": recipe, "alphas": {}}
    shared: dict[str, Any] = {}  # the centralized run: the pooled training set is the same for every alpha
    for alpha in ALPHAS:
        federation = ["federation.hospitals=5", "federation.partition=dirichlet", f"federation.alpha={alpha:g}",
                      "federation.seed=0"]
        runs: dict[str, Any] = {}
        for method, (command, extra) in METHODS.items():
            if method == "centralized" and shared:
                runs[method] = shared
                continue
            label = f"{name}-a0.5-{method}" if method == "centralized" else f"{name}-a{alpha:g}-{method}"
            overrides = [*data, *federation, *recipe, *extra]
            if method == "centralized":
                overrides = [*data, *federation[:2], "federation.alpha=0.5", "federation.seed=0", *recipe]
            runs[method] = _run(label, command, overrides, work, reuse)
            if method == "centralized":
                shared = runs[method]
        results["alphas"][f"{alpha:g}"] = {
            label: {"test_auc": _test_auc(runs[method]["summary"], part), "wall_s": runs[method]["wall_s"],
                    "command": runs[method]["command"]}
            for label, method, part in ROWS
        }
        logger.info("%s alpha %g: %s", name, alpha,
                    {k: v["test_auc"] for k, v in results["alphas"][f"{alpha:g}"].items()})
    return results


def bench_poisoning(data_dir: Path, work: Path, quick: bool, reuse: bool) -> dict[str, Any]:
    recipe = ["train.rounds=2", "train.local_epochs=1"] if quick else RECIPES[POISON_DATASET]
    common = ["dataset=medmnist", f"dataset.name={POISON_DATASET}", f"dataset.data_path={data_dir}",
              "federation.hospitals=5", "federation.partition=dirichlet", f"federation.alpha={POISON_ALPHA:g}",
              "federation.seed=0", *recipe]
    results: dict[str, Any] = {}
    cases = [(label, [*overrides, *NO_VALIDATION]) for label, overrides in ROBUST.items()]
    cases.append(("FedAvg + medfed's update validation", ["strategy=fedavg"]))
    for label, overrides in cases:
        slug = label.split(" ")[0].lower() + ("-validated" if "validation" in label else "")
        row: dict[str, Any] = {}
        for attack in ["clean", *ATTACKS]:
            run = _run(f"poison-{slug}-{attack}", ["simulate"], [*common, *overrides, *ATTACKS.get(attack, [])],
                       work, reuse)
            summary = run["summary"]
            row[attack] = {"test_auc": _test_auc(summary, "best"), "wall_s": run["wall_s"],
                           "rejected": sum(1 for r in _metrics(work / f"poison-{slug}-{attack}")
                                           for d in r.get("dropped", []) if "update rejected" in d.get("reason", "")),
                           "command": run["command"]}
        results[label] = row
        logger.info("poisoning %s: %s", label, {a: r["test_auc"] for a, r in row.items()})
    return results


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def floors(noniid: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in noniid.items():
        entry = result["alphas"].get("0.1")
        if not entry:
            continue
        fedavg = entry["FedAvg"]["test_auc"]
        federated = {k: v["test_auc"] for k, v in entry.items() if k not in ("centralized", "local-only")
                     and v["test_auc"] is not None}
        best = max(federated, key=federated.__getitem__)
        others = {k: v for k, v in federated.items() if k != "FedAvg"}
        best_other = max(others, key=others.__getitem__)
        ok = federated[best] >= (fedavg or 0.0)
        lines.append(f"- {name}, alpha 0.1: best federated method {best} {federated[best]:.4f} >= FedAvg "
                     f"{_fmt(fedavg)}: **{'PASS' if ok else 'FAIL'}**; best method other than FedAvg: {best_other} "
                     f"{others[best_other]:.4f} ({'beats' if others[best_other] > (fedavg or 0) else 'does not beat'} "
                     "FedAvg)")
    return lines


def render(noniid: dict[str, Any], poisoning: dict[str, Any], total_s: float, command: str) -> str:
    out = [START, "", f"`{command}` (total {total_s / 60:.1f} min on {platform.node() or 'this machine'}, "
           f"{platform.processor() or platform.machine()}; CPU only). Test AUC at the best-validation round; "
           "personalised rows: mean over the 5 hospitals' own models. Wall seconds in brackets.", ""]
    for name, result in noniid.items():
        alphas = list(result["alphas"])
        out += [f"**{name}** (`{' '.join(result['recipe'])}`, 5 hospitals, Dirichlet alpha, seed 0)", "",
                "| method | " + " | ".join(f"alpha {a}" for a in alphas) + " |",
                "|---|" + "---|" * len(alphas)]
        for label, _, _ in ROWS:
            cells = []
            for a in alphas:
                cell = result["alphas"][a].get(label, {})
                wall = cell.get("wall_s")
                cells.append(f"{_fmt(cell.get('test_auc'))} ({wall:.0f} s)" if wall else _fmt(cell.get("test_auc")))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Floor (alpha 0.1, the best strategy's AUC >= FedAvg's):", "", *floors(noniid), ""]
    if poisoning:
        out += [f"**Poisoning** ({POISON_DATASET}, alpha {POISON_ALPHA:g}, hospital 0 of 5 attacks every round; "
                "aggregators with medfed's update validation off unless named): test AUC at the best-validation "
                "round, change from the strategy's clean run, updates rejected by validation", "",
                "| strategy | clean | x100 update | change | noise N(0,1) | change |", "|---|---|---|---|---|---|"]
        for label, row in poisoning.items():
            clean = row["clean"]["test_auc"]
            cells = [_fmt(clean)]
            for attack in ATTACKS:
                auc = row[attack]["test_auc"]
                change = None if auc is None or clean is None else auc - clean
                rejected = row[attack]["rejected"]
                cells += [_fmt(auc) + (f" ({rejected} rejected)" if rejected else ""),
                          "-" if change is None else f"{change:+.4f}"]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def main() -> None:
    parser = benchmark_parser(__doc__, "strategies", list(RECIPES))
    parser.add_argument("--reuse", action="store_true", help="keep runs whose summary.json exists")
    parser.add_argument("--skip-poisoning", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    noniid = {name: bench_noniid(name, args.data_dir, args.work, args.quick, args.reuse) for name in args.datasets}
    poisoning = {} if args.skip_poisoning else bench_poisoning(args.data_dir, args.work, args.quick, args.reuse)
    total = time.time() - started
    command = "python benchmarks/strategies.py" + (" --quick" if args.quick else "")
    section = render(noniid, poisoning, total, command)
    print(section)
    if not args.quick:
        results_path = REPO / "benchmarks" / "results" / "strategies.json"
        results_path.write_text(json.dumps({"noniid": noniid, "poisoning": poisoning, "total_s": total}, indent=1) + "\n")
        write_doc(section, args.doc, start=START, end=END,
                  heading="Strategies under non-IID hospitals, and under a poisoned hospital")


if __name__ == "__main__":
    main()
