"""One round's numbers: each hospital's scalars, their validation-weighted means, and the round's metrics line.

Nothing here keeps state across rounds or touches the run directory: the tracker feeds what this computes to
selection, checkpointing and the output sinks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.common import keys
from medfed.common.noised_stats import EvalStatistics, auc_noise_se, pooled, statistics_from_metrics

__all__ = ["SiteRound", "mean_min_max", "round_record", "round_train_loss", "site_rounds", "weighted_metrics"]

logger = logging.getLogger(__name__)


@dataclass
class SiteRound:
    """One hospital's scalars in one round (any of them may be missing when the site dropped out)."""

    n_train: int | None = None
    n_val: int | None = None
    trained: bool = False  # whether the site sent a training reply this round (it trained)
    train_loss: float | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None  # only for the local-only baseline (each site's own model)
    epsilon: float | None = None  # with DP: the site's cumulative epsilon after this round (all runs on its data)
    delta: float | None = None
    integer_overflow: int | None = None  # distributed DP: values of the site's integer sum the range clipped
    ray_node: str | None = None  # simulation on Ray: the node that computed the site's reply (training's first)
    bytes_up: int | None = None  # the size of the site's training reply as the coordinator received it
    # personalisation: the site's personalised model (global + its own layers) and, after the last round, its
    # locally fine-tuned one: {"val": {...}, "test": {...}} (test in simulation only)
    personal: dict[str, dict[str, float]] | None = None
    finetuned: dict[str, Any] | None = None
    # the ensemble of the global model with the personalised (and, after the last round, fine-tuned) ones
    ensemble: dict[str, dict[str, float]] | None = None
    # metered (DP) evaluation: the site's noised statistics (val and n_val are computed from them) and the
    # standard deviation of the noise in each of their entries (data-independent: noise multiplier x sensitivity)
    noised: EvalStatistics | None = None
    noise_std: float | None = None
    # exact (non-metered) binary evaluation: the site's exact per-threshold counts (for the operating threshold)
    exact: EvalStatistics | None = None

    def as_record(self) -> dict[str, Any]:
        """The site's entry in the round's metrics line."""
        record: dict[str, Any] = {"n_train": self.n_train, "n_val": self.n_val, "trained": self.trained,
                                  "train_loss": self.train_loss, "train_s": self.train_s, "eval_s": self.eval_s}
        record["val"] = dict(self.val)
        if self.noised is not None:
            record["val_noised"] = True
        if self.test is not None:
            record["test"] = dict(self.test)
        if self.epsilon is not None:
            record["epsilon"], record["delta"] = self.epsilon, self.delta
        if self.integer_overflow is not None:
            record["integer_overflow"] = self.integer_overflow
        if self.ray_node is not None:
            record["ray_node"] = self.ray_node
        if self.bytes_up is not None:
            record["bytes_up"] = self.bytes_up
        if self.personal is not None:
            record["personal"] = self.personal
        if self.finetuned is not None:
            record["finetuned"] = self.finetuned
        if self.ensemble is not None:
            record["ensemble"] = self.ensemble
        return record


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def _personal_parts(metrics: Mapping[str, float], val_prefix: str, test_prefix: str) -> dict[str, Any] | None:
    val = _prefixed(metrics, val_prefix)
    if not val:
        return None
    test = _prefixed(metrics, test_prefix)
    return {"val": val, "test": test} if test else {"val": val}


def site_rounds(
    train: Mapping[str, Mapping[str, float]], evaluate: Mapping[str, Mapping[str, float]],
    *, nodes: Mapping[str, str] | None = None,
) -> dict[str, SiteRound]:
    """Per-site records of a round from the scalar metrics each hospital replied with, by site id (``nodes``: the
    Ray node each site's reply was computed on, in simulation)."""
    sites: dict[str, SiteRound] = {}
    for site_id, metrics in train.items():
        site = sites.setdefault(site_id, SiteRound(trained=True))
        site.n_train = int(metrics[keys.N_TRAIN]) if keys.N_TRAIN in metrics else None  # metered DP: not sent
        site.train_loss = metrics.get(keys.TRAIN_LOSS)
        site.train_s = metrics.get(keys.TRAIN_TIME_S, 0.0)
        site.epsilon = metrics.get(keys.EPSILON)
        site.delta = metrics.get(keys.DELTA)
        if keys.INTEGER_OVERFLOW in metrics:
            site.integer_overflow = int(metrics[keys.INTEGER_OVERFLOW])
        if keys.BYTES_UP in metrics:
            site.bytes_up = int(metrics[keys.BYTES_UP])
    for site_id, metrics in evaluate.items():
        site = sites.setdefault(site_id, SiteRound())
        site.eval_s = metrics.get(keys.EVAL_TIME_S, 0.0)
        if keys.EPSILON in metrics:  # a metered evaluation: the site's epsilon after it
            site.epsilon = max(site.epsilon or 0.0, float(metrics[keys.EPSILON]))
            site.delta = metrics.get(keys.DELTA, site.delta)
        if keys.NOISED_SSL_LOSS in metrics:  # metered SSL: the pretext loss from a noised sum and count
            count = max(float(metrics.get(keys.NOISED_COUNT, 0.0)), 0.0)
            site.n_val = int(round(count))
            loss = max(float(metrics[keys.NOISED_SSL_LOSS]), 0.0) / count if count >= 1 else math.nan
            site.val = {"loss": loss, "n": count}
            continue
        site.noised = statistics_from_metrics(metrics, keys.DP_STAT_PREFIX, keys.DP_CLASSES)
        if site.noised is not None:  # metered: the metrics are the coordinator's, from the noised statistics
            noise = metrics.get(keys.EVAL_NOISE)
            if noise is not None:
                site.noise_std = float(noise) * EvalStatistics.sensitivity(site.noised.n_classes)
            site.val = site.noised.metrics()
            site.n_val = int(round(site.noised.n))
            continue
        site.n_val = int(metrics.get(keys.N_VAL, metrics.get(keys.NUM_EXAMPLES, 0)))
        if site.n_train is None and keys.N_TRAIN in metrics:  # a site that evaluated but did not train
            site.n_train = int(metrics[keys.N_TRAIN])
        site.val = _prefixed(metrics, keys.EVAL_PREFIX)
        site.exact = statistics_from_metrics({**metrics, keys.DP_CLASSES: 2}, keys.VAL_STAT_PREFIX, keys.DP_CLASSES)
        site.personal = _personal_parts(metrics, keys.PERSONAL_PREFIX, keys.PERSONAL_TEST_PREFIX)
        site.finetuned = _personal_parts(metrics, keys.FINETUNED_PREFIX, keys.FINETUNED_TEST_PREFIX)
        site.ensemble = _personal_parts(metrics, keys.ENSEMBLE_PREFIX, keys.ENSEMBLE_TEST_PREFIX)
        if site.finetuned is not None and keys.FINETUNED_EPOCH in metrics:
            site.finetuned["epoch"] = int(metrics[keys.FINETUNED_EPOCH])
    for site_id, node in (nodes or {}).items():
        if site_id in sites:
            sites[site_id].ray_node = node
    return sites


def _global_val(site: SiteRound) -> Mapping[str, float]:
    return site.val


def weighted_metrics(
    sites: Mapping[str, SiteRound], of: Callable[[SiteRound], Mapping[str, float]] = _global_val
) -> dict[str, float]:
    """Validation metrics (``of`` each site: by default the global model's) averaged over sites weighted by
    validation size, each skipping sites where undefined. When every site's global validation came as noised
    statistics (metered DP), the metrics of their sum instead: the pooled validation split's, from noised counts,
    with ``auc_noise_se``, the standard error the noise puts on that AUC (for selection,
    :func:`medfed.server.tracking.selection.select_global`)."""
    noised = [s.noised for s in sites.values() if s.noised is not None]
    if of is _global_val and noised and len(noised) == sum(1 for s in sites.values() if s.val):
        total = pooled(noised)
        if total is not None:
            pooled_metrics = total.metrics()
            stds = [s.noise_std for s in sites.values() if s.noised is not None and s.noise_std is not None]
            noise = math.sqrt(sum(v * v for v in stds)) if len(stds) == len(noised) else math.inf
            if math.isfinite(noise):
                pooled_metrics["auc_noise_se"] = auc_noise_se(total, noise)
            return _with_threshold(pooled_metrics, total, noise)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for site in sites.values():
        w = float(site.n_val or 0)
        for key, value in of(site).items():
            sums.setdefault(key, 0.0)
            weights.setdefault(key, 0.0)
            if w > 0 and value is not None and math.isfinite(value):
                sums[key] += w * value
                weights[key] += w
    weighted = {k: (sums[k] / weights[k] if weights[k] > 0 else math.nan) for k in sums}
    exact = [s.exact for s in sites.values() if s.exact is not None]
    if of is _global_val and exact and len(exact) == sum(1 for s in sites.values() if s.val):
        return _with_threshold(weighted, pooled(exact))
    return weighted


def _with_threshold(
    metrics: dict[str, float], statistics: EvalStatistics | None, noise_std: float = 0.0
) -> dict[str, float]:
    """Binary tasks: the operating threshold chosen on the pooled validation counts (``threshold``; noised ones
    move it from 0.5 only by more than the noise's standard error), with the balanced accuracy, sensitivity and
    specificity there (``thr_*``), beside the metrics at 0.5."""
    threshold = statistics.threshold(noise_std) if statistics is not None else None
    if statistics is None or threshold is None:
        return metrics
    at = statistics.metrics_at(threshold)
    return {**metrics, "threshold": threshold, **{f"thr_{k}": at[k] for k in ("bal_acc", "sensitivity", "specificity")}}


def round_train_loss(sites: Mapping[str, SiteRound]) -> float:
    """The round's training loss: the sites' losses weighted by their training-set sizes (nan when none)."""
    train_losses = [(s.train_loss, s.n_train or 0) for s in sites.values() if s.train_loss is not None]
    total = sum(n for _, n in train_losses)
    return sum(v * n for v, n in train_losses) / total if total > 0 else math.nan


def mean_min_max(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of the finite values (all nan when there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(np.mean(finite)), "min": float(np.min(finite)), "max": float(np.max(finite))}


def round_record(
    server_round: int,
    *,
    mode: str,
    sites: Mapping[str, SiteRound],
    val: Mapping[str, float],
    test: Mapping[str, float] | None,
    dropped: list[dict[str, str]],
    round_compute_s: float,
    compute_s: float,
    elapsed_s: float,
    run_privacy: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The round's line of ``metrics.jsonl``: global train loss, weighted validation, test, per-site records,
    dropped sites, timings, privacy spent."""
    record: dict[str, Any] = {
        "round": server_round,
        "mode": mode,
        "train": {"loss": round_train_loss(sites)},
        "val": val,
        "test": dict(test) if test is not None else None,
        "sites": {site_id: s.as_record() for site_id, s in sorted(sites.items())},
        "dropped": dropped,
        "round_compute_s": round_compute_s,
        "compute_s": compute_s,
        "elapsed_s": elapsed_s,
    }
    epsilons = [s.epsilon for s in sites.values() if s.epsilon is not None]
    if epsilons:
        record["privacy"] = {"max_epsilon": max(epsilons)}
    if run_privacy is not None:
        record["privacy"] = {**record.get("privacy", {}), **run_privacy}
    if extra:
        record.update(extra)
    return record
