"""Benchmark: differential privacy small hospitals can afford (issue 19): `model=scatternet` under `privacy=dp`.

5 hospitals, Dirichlet(0.5), seed 0 (the federation of benchmarks/privacy.py). Rows: `model=scatternet` (a fixed
wavelet-scattering front end, a DP-trained linear head, features computed once per hospital) and a public-pretrained
frozen smallcnn with a DP-trained head (`model.finetune=linear_probe`; "public": trained without DP on the *other*
MedMNIST task), each at target epsilon 8, 3 and 1 with nothing but `privacy=dp privacy.target_epsilon=E` and the
federation/dataset overrides (the DP defaults must be good), and without DP (epsilon inf) on the same head recipe,
named explicitly. Beside them, the smallcnn DP-SGD rows of benchmarks/results/privacy.json (same federation,
measured by benchmarks/privacy.py on the date it names). Test AUC at the best-*validation* round (validation: the
hospitals' metered, noised statistics under DP); balanced accuracy at the threshold chosen on validation; the
membership-inference audit of every hospital (`evaluate.audit=true evaluate.audit_shadows=8`).

    python benchmarks/small_site_dp.py --data-dir ../shared/data/medmnist          # ~40 min on 2 cores
    python benchmarks/small_site_dp.py --data-dir ../shared/data/medmnist --quick  # a smoke run of the script

Writes docs/benchmarks.md (between the `small-site-dp` markers) and benchmarks/results/small_site_dp.json.
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
sys.path.insert(0, str(REPO))

from baselines import FEDERATION, TRAINED_NOWHERE, benchmark_parser, require_medmnist, run_medfed, write_doc
from privacy import dp_run_row

logger = logging.getLogger("benchmarks.small_site_dp")

START, END = "<!-- small-site-dp:start -->", "<!-- small-site-dp:end -->"
EPSILONS: list[float | None] = [None, 8.0, 3.0, 1.0]  # None = no DP (epsilon inf)
DATASETS = ["breastmnist", "pneumoniamnist"]
# floors of issue 19 (test AUC, privacy=dp model=scatternet with the DP defaults)
FLOORS: dict[tuple[str, str], float] = {("breastmnist", "8"): 0.82, ("breastmnist", "1"): 0.75,
                                        ("pneumoniamnist", "8"): 0.9275, ("pneumoniamnist", "1"): 0.92}


def _head_recipe() -> list[str]:
    """The DP head recipe as explicit overrides (for the run without DP, which would take the plain defaults)."""
    from medfed.common.config.private_recipes import HEAD_DP_RECIPE

    return [f"train.{k}={v}" for k, v in HEAD_DP_RECIPE.items()]


SPEED_ROUNDS = 20  # the DP recipe's rounds: the first computes the features, the others read them
OTHER = {"breastmnist": "pneumoniamnist", "pneumoniamnist": "breastmnist"}  # the "public" source of each target
AUDIT = ["evaluate.audit=true", "evaluate.audit_shadows=8"]  # measurement only: it trains nothing that is sent
PUBLIC_RECIPE = ["train.rounds=10", "train.local_epochs=2"]  # the source run (public data: no DP)


def _pretrain_public(name: str, data_dir: Path, work: Path, quick: bool) -> Path:
    """A federated smallcnn trained without DP on the *other* MedMNIST task (public data for this target)."""
    source = OTHER[name]
    run_dir = work / f"public-{source}"
    if not (run_dir / "best_model.pt").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        args = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), "--state-dir",
                str(work / f"public-{source}-state"), "dataset=medmnist", f"dataset.name={source}",
                f"dataset.data_path={data_dir}", *FEDERATION,
                *(["train.rounds=2", "train.local_epochs=1"] if quick else PUBLIC_RECIPE)]
        logger.info("public source %s: medfed %s", source, " ".join(args))
        code, _, out = run_medfed(args, cwd=REPO, timeout=3600)
        if code != 0:
            raise SystemExit(f"pretraining on {source} failed (exit {code}):\n{out[-4000:]}")
    return run_dir / "best_model.pt"


def _audit(summary: dict[str, Any], attack: str) -> dict[str, float | None]:
    """The attack's AUC and TPR at 1 % FPR: the mean over hospitals and the worst (largest)."""
    sites = [s.get(attack, {}) for s in ((summary.get("audit") or {}).get("sites") or {}).values()]
    out: dict[str, float | None] = {}
    for metric in ("auc", "tpr_at_0.01"):
        values = [v[metric] for v in sites if v.get(metric) is not None and v[metric] == v[metric]]
        out[f"{metric}_mean"] = sum(values) / len(values) if values else None
        out[f"{metric}_max"] = max(values) if values else None
    return out


def bench(name: str, data_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    base = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION, *AUDIT,
            *(["train.rounds=2"] if quick else [])]
    pretrained = _pretrain_public(name, data_dir, work, quick)
    variants = {"scatternet": ["model=scatternet"],
                "public-pretrained": ["model=smallcnn", f"model.pretrained={pretrained}",
                                      "model.finetune=linear_probe"]}
    out: dict[str, Any] = {}
    for variant, model in variants.items():
        runs: dict[str, Any] = {}
        for eps in EPSILONS:
            label = "inf" if eps is None else f"{eps:g}"
            extra = _head_recipe() if eps is None else ["privacy=dp", f"privacy.target_epsilon={eps}"]
            if quick and eps is None:
                extra = [o for o in extra if not o.startswith("train.rounds=")]
            tag = f"{name}-{variant}-eps{label}"
            run_dir, state_dir = work / tag, work / f"{tag}-state"
            for path in (run_dir, state_dir):
                shutil.rmtree(path, ignore_errors=True)
            args = ["simulate", "--run-dir", str(run_dir), "--cache-dir", str(work / "cache"), "--state-dir",
                    str(state_dir), *base, *model, *extra]
            logger.info("%s: medfed %s", tag, " ".join(args))
            code, _, text = run_medfed(args, cwd=REPO, timeout=3600)
            # a run that trained nowhere (every hospital refused) is a row too
            if code not in (0, TRAINED_NOWHERE) or not (run_dir / "summary.json").is_file():
                raise SystemExit(f"{tag} failed (exit {code}):\n{text[-4000:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            point = summary.get("operating_point") or {}
            shown = [c.replace(str(data_dir), "../shared/data/medmnist").replace(str(work), "WORK")
                     for c in [*base, *model, *extra]]
            runs[label] = {
                **dp_run_row(summary),
                "test_bal_acc_at_0.5": summary["best"]["test"].get("bal_acc"),
                "threshold": point.get("threshold"),
                "test_bal_acc_at_threshold": (point.get("test") or {}).get("bal_acc"),
                "loss_attack": _audit(summary, "loss"),
                "lira": _audit(summary, "lira"),
                "command": "medfed simulate --run-dir runs/" + tag + " " + " ".join(shown),
            }
            logger.info("  -> test AUC %.4f, max epsilon %s", runs[label]["test_auc"], runs[label]["max_epsilon"])
        out[variant] = runs
    return {"overrides": base, "variants": out}


def bench_speed(data_dir: Path) -> dict[str, Any]:
    """Wall seconds of one DP round (1 local epoch) at the largest BreastMNIST and PneumoniaMNIST hospital: smallcnn
    (batch 32, as benchmarks/privacy.py) against scatternet with its DP recipe, whose first round also computes
    the features and later rounds read them from the site's cache. Median of 3, in-process, 1 thread per round as
    the simulation gives each hospital."""
    import statistics
    import tempfile

    from medfed.client.training import DPTraining, configure_threads, train_epochs
    from medfed.common.config import compose_config
    from medfed.common.data.federation import load_site
    from medfed.common.models import build_model

    configure_threads(1, 1)
    out: dict[str, Any] = {}
    for name in DATASETS:
        base = ["dataset=medmnist", f"dataset.name={name}", f"dataset.data_path={data_dir}", *FEDERATION]
        sites = [load_site(compose_config(base), i) for i in range(5)]
        site = max(sites, key=lambda s: len(s.train))
        row: dict[str, Any] = {"n_train": len(site.train)}
        for label, overrides in (("smallcnn", ["privacy=dp", "train.batch_size=32"]),
                                 ("scatternet", ["privacy=dp", "model=scatternet"])):
            cfg = compose_config([*base, *overrides])
            times: dict[str, list[float]] = {"first": [], "cached": []}
            for repeat in range(3):
                with tempfile.TemporaryDirectory() as cache:
                    for key in ("first", "cached"):
                        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
                        result = train_epochs(model, site.train, cfg.train, epochs=1, n_classes=2, spatial_dims=2,
                                              seed=repeat, privacy=DPTraining(1.0, 1.0), feature_cache=Path(cache))
                        times[key].append(result.seconds)
            row[label] = {k: statistics.median(v) for k, v in times.items()}
            logger.info("%s %s: DP round %s", name, label, row[label])
        out[name] = row
    return out


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: dict[str, Any], smallcnn: dict[str, Any], smallcnn_date: str, total_s: float,
           command: str, speed: dict[str, Any] | None = None) -> str:
    lines = [
        START,
        (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, 2 cores, no GPU; whole script "
         f"{total_s / 60:.1f} min. Reproduce with:"),
        "",
        f"    {command}",
        "",
        ("5 hospitals, Dirichlet(0.5), seed 0, FedAvg. `scatternet`: `privacy=dp model=scatternet "
         "privacy.target_epsilon=E` and the dataset/federation overrides only; `public-pretrained`: a smallcnn "
         "trained without DP on the other MedMNIST task (BreastMNIST's source is PneumoniaMNIST and vice versa), "
         "frozen (`model.finetune=linear_probe`), its head trained with DP; epsilon inf: the same head recipe "
         "without DP. Every run with `evaluate.audit=true evaluate.audit_shadows=8`. `smallcnn`: the DP-SGD rows "
         f"of benchmarks/results/privacy.json (measured {smallcnn_date}, its recipe, no threshold or audit). Test "
         "AUC at the best-validation round; bal acc @thr: test balanced accuracy at the threshold the hospitals' "
         "validation counts chose (@0.5 beside it); max epsilon: the largest cumulative epsilon any hospital "
         "reached; attack AUC / TPR@1%: membership inference by each hospital on its own data (mean over "
         "hospitals / worst hospital), outside DP's guarantee."),
        "",
        ("| dataset | model | epsilon | test AUC | bal acc @thr (thr) | bal acc @0.5 | max epsilon | refusals | "
         "loss-attack AUC mean/max | LiRA AUC mean/max | LiRA TPR@1% mean/max | wall s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks: list[tuple[str, bool]] = []
    for name, res in results.items():
        rows = list(res["variants"].items())
        if name in smallcnn:
            rows.append(("smallcnn", smallcnn[name]["runs"]))
        for model, runs in rows:
            for label, r in runs.items():
                loss, lira = r.get("loss_attack") or {}, r.get("lira") or {}
                thr = (f"{_f(r.get('test_bal_acc_at_threshold'))} ({_f(r.get('threshold'), 2)})"
                       if r.get("threshold") is not None else "-")
                lines.append(
                    f"| {name} | {model} | {label} | {r['test_auc']:.4f} | {thr} | {_f(r.get('test_bal_acc_at_0.5'))} "
                    f"| {_f(r['max_epsilon'], 3)} | {r['dropped']} | {_f(loss.get('auc_mean'), 3)}/"
                    f"{_f(loss.get('auc_max'), 3)} | {_f(lira.get('auc_mean'), 3)}/{_f(lira.get('auc_max'), 3)} | "
                    f"{_f(lira.get('tpr_at_0.01_mean'), 3)}/{_f(lira.get('tpr_at_0.01_max'), 3)} | "
                    f"{r['wall_s']:.1f} |")
        runs = res["variants"]["scatternet"]
        for label, r in runs.items():
            if label != "inf" and r["max_epsilon"] is not None:
                checks.append((f"{name} scatternet: epsilon spent {r['max_epsilon']:.3f} <= target {label}",
                               r["max_epsilon"] <= float(label) + 1e-9))
            floor = FLOORS.get((name, label))
            if floor is not None:
                checks.append((f"{name} scatternet epsilon {label}: test AUC {r['test_auc']:.4f} >= {floor}",
                               r["test_auc"] >= floor))
        if "8" in runs:
            r = runs["8"]
            bal = r.get("test_bal_acc_at_threshold")
            text = f"{name} scatternet epsilon 8: balanced accuracy at the validation threshold {_f(bal)} >= 0.70"
            checks.append((text, bal is not None and bal >= 0.70))
            for attack, key in (("loss-attack", "loss_attack"), ("LiRA", "lira")):
                mean, worst = (r.get(key) or {}).get("auc_mean"), (r.get(key) or {}).get("auc_max")
                checks.append((f"{name} scatternet epsilon 8: {attack} AUC mean {_f(mean, 3)} <= 0.55",
                               mean is not None and mean <= 0.55))
                checks.append((f"{name} scatternet epsilon 8: {attack} AUC worst hospital {_f(worst, 3)} <= 0.55",
                               worst is not None and worst <= 0.55))
    if speed:
        lines += ["", ("One DP round (1 local epoch, noise 1, clip 1) at the largest hospital, median of 3, 1 thread: "
                       "smallcnn at batch 32; scatternet with its DP recipe, its first round computing the features, "
                       "later ones reading them from the site's cache:"), "",
                  "| dataset | training images | smallcnn s | scatternet first round s | scatternet later rounds s |",
                  "|---|---|---|---|---|"]
        for name, row in speed.items():
            lines.append(f"| {name} | {row['n_train']} | {row['smallcnn']['cached']:.2f} | "
                         f"{row['scatternet']['first']:.2f} | {row['scatternet']['cached']:.2f} |")
            scatter, cnn = row["scatternet"], row["smallcnn"]
            per_round = (scatter["first"] + (SPEED_ROUNDS - 1) * scatter["cached"]) / SPEED_ROUNDS
            text = (f"{name}: a scatternet DP round {scatter['cached']:.2f} s once its features are cached, "
                    f"{per_round:.2f} s a round over a {SPEED_ROUNDS}-round run with the first round's "
                    f"{scatter['first']:.2f} s, <= smallcnn's {cnn['cached']:.2f} s")
            checks.append((text, scatter["cached"] <= cnn["cached"] and per_round <= cnn["cached"]))
    lines += ["", "Floors (issue 19):", ""]
    lines += [f"- {text} — {'PASS' if ok else 'FAIL'}" for text, ok in checks]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "bench-small-site-dp", DATASETS)
    parser.add_argument("--skip-utility", action="store_true",
                        help="only the round-time part; the utility table is kept from the last full run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    require_medmnist(args.data_dir, args.datasets)
    args.work.mkdir(parents=True, exist_ok=True)
    out_json = REPO / "benchmarks" / "results" / "small_site_dp.json"
    started = time.time()
    kept = json.loads(out_json.read_text()) if args.skip_utility and out_json.is_file() else {}
    results = kept.get("results") if args.skip_utility else {
        name: bench(name, args.data_dir.resolve(), args.work.resolve(), args.quick) for name in args.datasets}
    speed = bench_speed(args.data_dir.resolve())
    total = time.time() - started + (kept.get("total_s", 0.0) if args.skip_utility else 0.0)
    previous = REPO / "benchmarks" / "results" / "privacy.json"
    smallcnn = json.loads(previous.read_text()) if previous.is_file() else {}
    command = ("python benchmarks/small_site_dp.py --data-dir ../shared/data/medmnist"
               + (" --quick" if args.quick else ""))
    section = render(results or {}, smallcnn.get("utility", {}), smallcnn.get("utility_measured", "earlier"), total,
                     command, speed)
    print(section)
    if not args.quick:
        write_doc(section, args.doc, start=START, end=END,
                  heading="Small-site DP: privacy-cheap features (model=scatternet)")
        out_json.write_text(json.dumps({"results": results, "speed": speed, "total_s": total,
                                        "measured": kept.get("measured") or time.strftime("%Y-%m-%d")},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
