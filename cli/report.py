"""``medfed report RUN_DIR``: one self-contained HTML page (and PNG files) of a run's results.

The page holds, as far as the run has them: learning curves per round, each hospital's validation AUC per round,
the selected encoder's test-set embeddings (PCA) with their silhouette and Davies-Bouldin scores,
each hospital's cumulative epsilon per round (DP runs), ROC and reliability curves of the selected model on the test
set (before and after temperature scaling) and the pooled validation reliability the hospitals reported, the
referral curves of the uncertainty analysis, the summary tables, the config and the software environment. Plots are
PNG files in ``RUN_DIR/report/`` and are embedded in ``RUN_DIR/report.html`` as data URIs, so the page can be
mailed or archived alone. Everything comes from the run directory: nothing is recomputed from images.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.cli.display import operating_point_rows
from medfed.common.errors import ConfigError
from medfed.common.metrics import reliability_bins, roc_curve

__all__ = ["Plot", "write_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plot:
    """One figure of the report: its PNG file and caption."""

    name: str
    title: str
    path: Path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _learning_curves(records: list[dict[str, Any]], ax_loss, ax_auc) -> None:
    rounds = [r["round"] for r in records]
    ax_loss.plot(rounds, [_finite(r.get("train", {}).get("loss")) for r in records], "o-", label="train loss")
    ax_loss.plot(rounds, [_finite(r.get("val", {}).get("loss")) for r in records], "s-", label="validation loss")
    ax_auc.plot(rounds, [_finite(r.get("val", {}).get("auc")) for r in records], "o-", label="validation AUC")
    if any(r.get("test") for r in records):
        ax_auc.plot(rounds, [_finite((r.get("test") or {}).get("auc")) for r in records], "s-", label="test AUC")
    for ax, label in ((ax_loss, "loss"), (ax_auc, "AUC")):
        _round_axis(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()


def _per_site(records: list[dict[str, Any]], ax, value: Callable[[Mapping[str, Any]], Any], label: str) -> bool:
    sites = sorted({site for r in records for site in r.get("sites", {})})
    drawn = False
    for site in sites:
        points = [(r["round"], _finite(value(r["sites"][site]))) for r in records if site in r.get("sites", {})]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=site)
            drawn = True
    _round_axis(ax)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    return drawn


def _reliability(ax, table: list[dict[str, float]], label: str, marker: str) -> None:
    points = [(b["confidence"], b["accuracy"]) for b in table if b["count"] and math.isfinite(b["confidence"])]
    if points:
        ax.plot(*zip(*points, strict=True), marker, label=label)


class _Plotter:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.plots: list[Plot] = []
        self.plt = _figure()

    def save(self, fig, name: str, title: str) -> None:
        path = self.out_dir / f"{name}.png"
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        self.plt.close(fig)
        self.plots.append(Plot(name, title, path))


def _plots(run_dir: Path, summary: Mapping[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[Plot]:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = _Plotter(out_dir)
    plt = p.plt
    if records:
        fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
        _learning_curves(records, ax_loss, ax_auc)
        p.save(fig, "learning_curves", "Learning curves (global model)")
        fig, ax = plt.subplots(figsize=(7, 4))
        if _per_site(records, ax, lambda s: (s.get("val") or {}).get("auc"), "validation AUC"):
            p.save(fig, "site_auc", "Validation AUC per hospital")
        else:
            plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        if _per_site(records, ax, lambda s: s.get("epsilon"), "cumulative epsilon"):
            p.save(fig, "epsilon", "Privacy spent per hospital (epsilon, all runs on its data)")
        else:
            plt.close(fig)

    predictions = run_dir / "evaluation" / "test_predictions.npz"
    saved = dict(np.load(predictions)) if predictions.is_file() else {}
    labels = saved.get("labels")
    variants = {k[len("probs_"):]: v for k, v in saved.items() if k.startswith("probs_")}
    if labels is not None and variants and next(iter(variants.values())).shape[1] == 2 and 0 < labels.sum() < labels.size:
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, probs in variants.items():
            fpr, tpr = roc_curve(labels == 1, probs[:, 1])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend()
        ax.grid(alpha=0.3)
        p.save(fig, "roc", "ROC on the test set (selected model)")
    calibration = summary.get("calibration") or {}
    if variants or calibration.get("reliability"):
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
        for name, probs in variants.items():
            if name in ("model", "calibrated") and labels is not None:
                _reliability(ax, reliability_bins(labels, probs), f"test, {name}", "o-")
        for key, label in (("val_before", "validation (hospitals), model"), ("val_after", "validation, calibrated")):
            if key in (calibration.get("reliability") or {}):
                _reliability(ax, calibration["reliability"][key], label, "s--")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        p.save(fig, "reliability", "Reliability (top-class confidence vs accuracy)")
    uncertainty = (summary.get("uncertainty") or {}).get("test") or {}
    if uncertainty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, part in uncertainty.items():
            curve = part.get("referral") or []
            ax.plot([c["refer"] for c in curve], [_finite(c["auc"]) for c in curve], "o-", label=name)
        ax.set_xlabel("fraction referred to a human (most uncertain first)")
        ax.set_ylabel("AUC on the images kept")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        p.save(fig, "referral", "Referral: AUC when the most uncertain cases go to a clinician")
    embedding = run_dir / "embedding.png"
    if embedding.is_file():  # drawn by the run (the selected encoder's test-set embeddings)
        target = out_dir / "embedding.png"
        target.write_bytes(embedding.read_bytes())
        p.plots.append(Plot("embedding", "Test-set embeddings of the selected encoder (PCA)", target))
    return p.plots


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "-"
    return "-" if value is None else html.escape(str(value))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_tables(summary: Mapping[str, Any]) -> str:
    parts = []
    rows = []
    for label in ("best", "final"):
        part = summary.get(label) or {}
        val, test = part.get("val") or {}, part.get("test") or {}
        rows.append([label, part.get("round"), val.get("auc"), val.get("acc"), test.get("auc"), test.get("acc"),
                     test.get("ece")])
    parts.append(_table(rows, ["model", "round", "val AUC", "val acc", "test AUC", "test acc", "test ECE"]))
    site_rows = [[site, s.get("n_train"), s.get("n_val"), (s.get("val") or {}).get("auc"),
                  (s.get("val") or {}).get("ece"), s.get("epsilon")] for site, s in (summary.get("sites") or {}).items()]
    parts.append("<h3>Hospitals (at the selected round)</h3>")
    parts.append(_table(site_rows, ["site", "train images", "val images", "val AUC", "val ECE", "epsilon"]))
    point = summary.get("operating_point") or {}
    if point:
        parts.append(f"<h3>Decision threshold {_fmt(point.get('threshold'))}, chosen on the hospitals' pooled "
                     f"validation counts (round {_fmt(point.get('round'))}); the test set never chose it</h3>")
        parts.append(_table(operating_point_rows(point),
                            ["decisions", "threshold", "balanced acc", "sensitivity", "specificity", "acc"]))
    audit = summary.get("audit") or {}
    if audit.get("sites"):
        parts.append("<h3>Privacy audit: membership inference by each hospital on its own data</h3>"
                     f"<p>{html.escape(str(audit.get('note', '')))}. An attack AUC near 0.5 means the attack cannot "
                     "tell training images from held-out ones.</p>")
        rows = [[site, attack, v.get("auc"), v.get("tpr_at_0.01"), v.get("tpr_at_0.001")]
                for site, per_attack in sorted(audit["sites"].items()) for attack, v in sorted(per_attack.items())]
        parts.append(_table(rows, ["site", "attack", "AUC", "TPR at 1 % FPR", "TPR at 0.1 % FPR"]))
    calibration = summary.get("calibration") or {}
    if calibration.get("temperature") is not None:
        val = calibration.get("val") or {}
        parts.append(f"<h3>Temperature scaling (fitted on the hospitals' validation splits): T = "
                     f"{calibration['temperature']:.3f}</h3>")
        rows = [["pooled", val.get("n"), val.get("ece_before"), val.get("ece_after")]]
        rows += [[site, s.get("n_val"), s.get("ece_before"), s.get("ece_after")]
                 for site, s in (calibration.get("sites") or {}).items()]
        parts.append(_table(rows, ["validation", "images", "ECE before", "ECE after"]))
    uncertainty = (summary.get("uncertainty") or {}).get("test") or {}
    if uncertainty:
        rows = []
        for name, part in uncertainty.items():
            m = part.get("metrics") or {}
            refer = {c["refer"]: c["auc"] for c in part.get("referral") or []}
            rows.append([name, m.get("auc"), m.get("acc"), m.get("ece"), m.get("loss"), refer.get(0.1), refer.get(0.2)])
        parts.append("<h3>Test set: the selected model and its uncertainty-aware variants</h3>")
        parts.append(_table(rows, ["variant", "AUC", "acc", "ECE", "NLL", "AUC, 10 % referred", "AUC, 20 % referred"]))
    representation = summary.get("representation")
    if representation:
        parts.append("<h3>Representation quality (test-set embeddings by class)</h3>")
        parts.append(_table([[representation.get("n"), representation.get("silhouette"),
                              representation.get("davies_bouldin")]],
                            ["images", "silhouette (higher is better)", "Davies-Bouldin (lower is better)"]))
    privacy = summary.get("privacy")
    if privacy:
        parts.append("<h3>Privacy</h3><pre>" + html.escape(json.dumps(privacy, indent=1)) + "</pre>")
    return "\n".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# after load: how many embedded plots decoded (a browser test reads data-plots-rendered)
_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  var rendered = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-plots-rendered", String(rendered));
});
</script>
"""


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report/*.png``; returns the page's path.

    Raises:
        ConfigError: ``run_dir`` holds no finished run (no ``summary.json``), or its files are unreadable.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(
            f"{run_dir} holds no finished run (no summary.json); give the folder a `medfed simulate`, `medfed train` "
            "or baseline run wrote, after it finished."
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{run_dir}'s run files cannot be read ({type(exc).__name__}: {exc}).") from None
    plots = _plots(run_dir, summary, records, run_dir / "report")
    config = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else "-"
    environment_path = run_dir / "environment.json"
    environment = environment_path.read_text(encoding="utf-8") if environment_path.is_file() else "not recorded"
    figures = "\n".join(
        f'<figure><img class="plot" alt="{html.escape(p.title)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.path.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.title)} ({p.path.name})</figcaption></figure>"
        for p in plots
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medfed run {html.escape(run_dir.name)}</title>
<style>{_STYLE}</style></head>
<body data-plots-expected="{len(plots)}">
<h1>medfed run {html.escape(run_dir.name)}</h1>
<p>{_fmt(summary.get("mode"))}: {_fmt(summary.get("rounds"))} of {_fmt(summary.get("planned_rounds"))} rounds,
wall {_fmt(_finite(summary.get("wall_s")))} s. Model selection on validation data; the test set only reports.</p>
{f'<p>Stopped: {html.escape(str(summary["stopped"]))}</p>' if summary.get("stopped") else ""}
<h2>Results</h2>
{_summary_tables(summary)}
<h2>Plots</h2>
{figures}
<h2>Config</h2><pre>{html.escape(config)}</pre>
<h2>Environment</h2><pre>{html.escape(environment)}</pre>
{_CHECK}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
