"""After the last round: federated temperature scaling, and the coordinator's uncertainty analysis of the test set.

**Calibration** (``evaluate.calibrate``) takes the selected model (best validation round) through two evaluate
messages to every hospital: ``calibrate`` (each replies its validation NLL summed at each temperature of a grid;
the coordinator adds them and takes the least) and ``reliability`` (each replies its reliability sums before and
after that temperature, so per-site and pooled ECE and reliability data need no image, logit or label). A hospital
that fails or does not answer is left out with its reason; calibration is skipped when none answers.

**Uncertainty** (when the coordinator holds a test split: simulation, or the task's public test set) compares the
selected model as trained, temperature-scaled, with MC dropout (``evaluate.mc_samples``) and as a snapshot
ensemble of the last rounds' global models (``evaluate.snapshots``): test metrics and the referral curve of each.
The test set only ever *reports*: the temperature is fitted on validation data.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfed.common import keys
from medfed.common.calibration import TEMPERATURES, fit_temperature
from medfed.common.config import Config
from medfed.common.data import ArrayDataset
from medfed.common.inference import predict_logits, softmax
from medfed.common.metrics import (
    ECE_BINS,
    classification_metrics,
    ece_from_sums,
    metrics_at_threshold,
    reliability_from_sums,
)
from medfed.common.models.weights import load_checkpoint
from medfed.common.uncertainty import mc_dropout_proba, mean_proba, predictive_entropy, referral_curve
from medfed.server.runs import RunDirectory

__all__ = ["audit_federated", "calibrate_federated", "final_nodes", "operating_point", "uncertainty_on_test_set"]

logger = logging.getLogger(__name__)


def final_nodes(grid: Grid, fraction: float, minimum: int, seed: int) -> list[int]:
    """The hospitals the final stages ask: every connected one, or, with ``strategy.fraction_evaluate`` < 1, as
    many as a round's evaluation asks (``max(int(fraction x connected), minimum)``, Flower's rule), drawn once with
    ``seed`` so every stage asks the same ones (a 1,000-hospital simulation calibrates on its sample, not on all)."""
    node_ids = sorted(int(n) for n in grid.get_node_ids())
    wanted = min(len(node_ids), max(int(len(node_ids) * fraction), minimum))
    if wanted >= len(node_ids):
        return node_ids
    return sorted(random.Random(seed).sample(node_ids, wanted))


def _send(
    grid: Grid, state: Mapping[str, np.ndarray], config: dict[str, Any], timeout: float | None,
    node_ids: Sequence[int] | None = None,
) -> tuple[dict[str, Mapping[str, Any]], list[dict[str, str]]]:
    """One evaluate message with the model and ``config`` to each of ``node_ids`` (default: every connected
    hospital); their metrics by site id, and the hospitals that failed (with the PHI-free reason they sent) or did
    not answer."""
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    node_ids = list(grid.get_node_ids()) if node_ids is None else list(node_ids)
    messages = [
        Message(
            content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(config)}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node_id,
        )
        for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    metrics: dict[str, Mapping[str, Any]] = {}
    failed: list[dict[str, str]] = []
    for reply in replies:
        if reply.has_error():
            failed.append({"node": str(reply.metadata.src_node_id), "reason": reply.error.reason or ""})
            continue
        site = reply.content.config_records.get(keys.SITE)
        record = reply.content.metric_records.get(keys.METRICS)
        if site is None or record is None:
            failed.append({"node": str(reply.metadata.src_node_id), "reason": "reply without site id or metrics"})
            continue
        metrics[str(site[keys.SITE_ID])] = dict(record)
    answered = {int(r.metadata.src_node_id) for r in replies}
    failed += [{"node": str(n), "reason": "no reply before the round timeout"} for n in node_ids if n not in answered]
    return metrics, failed


def _sums(values: Any) -> np.ndarray:
    """Reliability sums as sent (noised ones clipped at 0: a count or sum below 0 is noise)."""
    return np.clip(np.asarray(values, dtype=np.float64).reshape(3, ECE_BINS), 0.0, None)


def _count(metrics: Mapping[str, Any]) -> float:
    """The validation images behind a final-stage reply: the exact count, or a metered hospital's noised one."""
    if keys.NOISED_COUNT in metrics:
        return max(float(metrics[keys.NOISED_COUNT]), 0.0)
    return float(metrics.get(keys.NUM_EXAMPLES, 0))


def _grid_of(metrics: Mapping[str, Any], default: list[float]) -> list[float]:
    return [float(t) for t in metrics.get(keys.TEMPERATURES, default)]


def _on_one_grid(
    replies: dict[str, Mapping[str, Any]], asked: list[float]
) -> tuple[dict[str, Mapping[str, Any]], list[dict[str, str]], list[float]]:
    """The replies whose sums are on the grid most of them used (a site may answer on its own grid, or on fewer
    points under DP), the others dropped with the reason (sums on different grids do not add up), and that grid
    (the one asked when no reply is kept)."""
    grids = [tuple(_grid_of(m, asked)) for m in replies.values()]
    if not grids:
        return replies, [], asked
    common = max(set(grids), key=lambda g: (grids.count(g), g == tuple(asked)))
    kept = {site: m for (site, m), g in zip(replies.items(), grids, strict=True) if g == common}
    dropped = [{"node": site, "reason": f"calibration sums on a grid of {len(g)} temperatures, not the "
                f"{len(common)} most hospitals used"} for (site, _), g in zip(replies.items(), grids, strict=True)
               if g != common]
    return kept, dropped, list(common)


def calibrate_federated(
    grid: Grid, state: Mapping[str, np.ndarray], *, timeout: float | None, node_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """Fit one temperature for the model ``state`` on the validation splits of ``node_ids`` (default: every
    hospital); the result's ``temperature`` is None (with ``skipped``: why) when no hospital returned usable sums."""
    grid_t = list(TEMPERATURES)
    replies, failed = _send(
        grid, state, {keys.FINAL_STAGE: keys.STAGE_CALIBRATE, keys.TEMPERATURES: grid_t}, timeout, node_ids
    )
    usable = {site: m for site, m in replies.items() if keys.NLL_SUMS in m and _count(m) > 0}
    usable, other_grids, grid_t = _on_one_grid(usable, grid_t)
    failed += other_grids
    result: dict[str, Any] = {"temperature": None, "grid": {"min": grid_t[0], "max": grid_t[-1], "steps": len(grid_t)},
                              "dropped": failed}
    if not usable:
        result["skipped"] = "no hospital returned validation NLL sums"
        logger.warning("calibration skipped: %s", result["skipped"])
        return result
    totals = np.sum([np.asarray(m[keys.NLL_SUMS], dtype=np.float64) for m in usable.values()], axis=0)
    n_val = sum(_count(m) for m in usable.values())
    temperature = fit_temperature(totals, grid_t)
    one = grid_t.index(1.0) if 1.0 in grid_t else int(np.argmin(np.abs(np.log(grid_t))))
    result.update({"temperature": temperature, "sites_fitted": sorted(usable)})
    if any(keys.NOISED_COUNT in m for m in usable.values()):
        result["noised"] = True  # metered hospitals: sums and counts carry their DP noise
    if temperature in (grid_t[0], grid_t[-1]):  # the least NLL may lie beyond the grid: say so
        result["at_grid_edge"] = True
        logger.warning("the fitted temperature %.4g is at the edge of the grid", temperature)

    replies, failed_2 = _send(
        grid, state, {keys.FINAL_STAGE: keys.STAGE_RELIABILITY, keys.TEMPERATURE: temperature}, timeout, node_ids
    )
    result["dropped"] = failed + failed_2
    sites: dict[str, Any] = {}
    pooled_before = np.zeros((3, ECE_BINS))
    pooled_after = np.zeros((3, ECE_BINS))
    gradcam: dict[str, int] = {}
    for site, m in sorted(replies.items()):
        if keys.RELIABILITY_BEFORE not in m:
            continue
        before, after = _sums(m[keys.RELIABILITY_BEFORE]), _sums(m[keys.RELIABILITY_AFTER])
        pooled_before += before
        pooled_after += after
        sites[site] = {"n_val": _count(m), "ece_before": ece_from_sums(before),
                       "ece_after": ece_from_sums(after)}
        if keys.GRADCAM_SAVED in m:
            gradcam[site] = int(m[keys.GRADCAM_SAVED])
    result["val"] = {
        "n": n_val,
        "nll_before": float(totals[one] / n_val),
        "nll_after": float(totals[grid_t.index(temperature)] / n_val),
        "ece_before": ece_from_sums(pooled_before),
        "ece_after": ece_from_sums(pooled_after),
    }
    result["sites"] = sites
    result["reliability"] = {"val_before": reliability_from_sums(pooled_before),
                             "val_after": reliability_from_sums(pooled_after)}
    if gradcam:
        result["gradcam_saved"] = gradcam
    logger.info("temperature %.3f: validation ECE %.4f -> %.4f", temperature, result["val"]["ece_before"],
                result["val"]["ece_after"])
    return result


def _variant(labels: np.ndarray, probs: np.ndarray, uncertainty: np.ndarray) -> dict[str, Any]:
    return {"metrics": classification_metrics(labels, probs), "referral": referral_curve(labels, probs, uncertainty)}


def uncertainty_on_test_set(
    cfg: Config,
    model: torch.nn.Module,
    state: Mapping[str, np.ndarray],
    test_set: ArrayDataset,
    run_dir: RunDirectory,
    *,
    temperature: float | None,
    up_to_round: int | None,
) -> dict[str, Any]:
    """Test metrics and referral curves of the selected model's variants; writes their test probabilities to
    ``RUN_DIR/evaluation/test_predictions.npz`` (labels, ``probs_<variant>``) (the report's ROC and reliability curves)."""
    batch = cfg.train.eval_batch_size
    labels = np.asarray(test_set.labels).reshape(-1)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    logits = predict_logits(model, test_set.images, batch_size=batch)
    probs: dict[str, np.ndarray] = {"model": softmax(logits)}
    t = temperature if temperature is not None and math.isfinite(temperature) else 1.0
    if temperature is not None:
        probs["calibrated"] = softmax(logits, t)
    uncertainty = {name: predictive_entropy(p) for name, p in probs.items()}
    extra: dict[str, Any] = {}
    if cfg.evaluate.mc_samples > 0:
        passes = mc_dropout_proba(model, test_set.images, samples=cfg.evaluate.mc_samples, seed=cfg.train.seed,
                                  temperature=t, batch_size=batch)
        probs["mc_dropout"] = passes.mean(axis=0)
        uncertainty["mc_dropout"] = predictive_entropy(probs["mc_dropout"])
        variance = passes.var(axis=0).mean(axis=1)  # per image: the passes' variance, mean over classes
        extra["mc_dropout"] = {"samples": cfg.evaluate.mc_samples, "mean_variance": float(variance.mean()),
                               "max_variance": float(variance.max())}
    if cfg.evaluate.snapshots > 0:
        paths = run_dir.snapshot_paths(up_to=up_to_round)
        if len(paths) >= 2:
            members = []
            for path in paths:
                snapshot, _ = load_checkpoint(path)
                model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in snapshot.items()})
                members.append(softmax(predict_logits(model, test_set.images, batch_size=batch), t))
            probs["snapshot_ensemble"] = mean_proba(members)
            uncertainty["snapshot_ensemble"] = predictive_entropy(probs["snapshot_ensemble"])
            extra["snapshot_ensemble"] = {"members": [int(p.stem.split("-")[1]) for p in paths]}
        else:
            extra["snapshot_ensemble"] = {"skipped": f"{len(paths)} snapshot(s) on disk; an ensemble needs 2"}
    variants = {name: _variant(labels, p, uncertainty[name]) for name, p in probs.items()}
    run_dir.evaluation_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"labels": labels, **{f"probs_{name}": p for name, p in probs.items()}}
    np.savez_compressed(run_dir.evaluation_dir / "test_predictions.npz", **arrays)
    return {"test": variants, **extra}


def operating_point(
    cfg: Config, model: torch.nn.Module, state: Mapping[str, np.ndarray], test_set: ArrayDataset | None,
    val: Mapping[str, float], best_round: int | None,
) -> dict[str, Any] | None:
    """Binary tasks: the decision threshold the hospitals' pooled validation counts chose at the selected round
    (``val["threshold"]``, never the test set), with the validation rates there and, in simulation, the test
    metrics at that threshold and at 0.5 (the selected model's uncalibrated probabilities). None when the run has
    no threshold (multi-class, SSL, a class missing from validation)."""
    threshold = val.get("threshold")
    if threshold is None or not math.isfinite(float(threshold)):
        return None
    out: dict[str, Any] = {"threshold": float(threshold), "round": best_round, "chosen_on": "validation",
                           "val": {k[len("thr_"):]: v for k, v in val.items() if k.startswith("thr_")}}
    if test_set is not None and len(test_set):
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        probs = softmax(predict_logits(model, test_set.images, batch_size=cfg.train.eval_batch_size))
        out["test"] = metrics_at_threshold(test_set.labels, probs, float(threshold))
        out["test_at_0.5"] = metrics_at_threshold(test_set.labels, probs, 0.5)
    return out


AUDIT_NOTE = ("membership inference by each hospital on its own data (members: its training images, non-members: "
              "its held-out ones); these numbers are outside DP-SGD's guarantee (computed on the exact data)")


def audit_federated(
    grid: Grid, state: Mapping[str, np.ndarray], *, shadows: int, timeout: float | None,
    node_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Ask each of ``node_ids`` (default: every hospital) to attack the model ``state`` with membership inference
    on its own data; the summary's ``audit``: each answering site's attack AUC and TPR at 1 % and 0.1 % FPR per
    attack, and the worst (largest) over sites, beside the hospitals that refused or failed."""
    replies, failed = _send(grid, state, {keys.FINAL_STAGE: keys.STAGE_AUDIT}, timeout, node_ids)
    sites: dict[str, dict[str, dict[str, float]]] = {}
    for site, m in sorted(replies.items()):
        for key, value in m.items():
            if not key.startswith(keys.AUDIT_PREFIX) or not isinstance(value, (int, float)):
                continue
            attack, _, metric = key[len(keys.AUDIT_PREFIX):].partition("-")
            sites.setdefault(site, {}).setdefault(attack, {})[metric] = float(value)
    worst: dict[str, dict[str, float]] = {}
    for per_site in sites.values():
        for attack, values in per_site.items():
            for metric, value in values.items():
                if math.isfinite(value):
                    slot = worst.setdefault(attack, {})
                    slot[metric] = max(slot.get(metric, -math.inf), value)
    result: dict[str, Any] = {"sites": sites, "max": worst, "shadows": shadows, "dropped": failed, "note": AUDIT_NOTE}
    logger.info("privacy audit: %d hospitals answered, worst loss-attack AUC %s", len(sites),
                worst.get("loss", {}).get("auc"))
    return result
