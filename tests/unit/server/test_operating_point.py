"""The binary decision threshold: chosen on the hospitals' pooled validation counts, reported on test beside 0.5."""

from __future__ import annotations

import numpy as np
import pytest
from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.data import ArrayDataset
from medfed.common.metrics import metrics_at_threshold
from medfed.common.noised_stats import EvalStatistics
from medfed.server.final import operating_point
from medfed.server.tracking.rounds import site_rounds, weighted_metrics


def _binary_probs(p1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p1, p1], axis=1)


def test_the_threshold_maximises_balanced_accuracy_over_the_bin_edges() -> None:
    # Prepare: negatives score 0.62-0.68, positives 0.72-0.88 (a model that says "1" to everything at 0.5)
    labels = np.array([0] * 6 + [1] * 4)
    p1 = np.array([0.62, 0.64, 0.66, 0.68, 0.63, 0.67, 0.72, 0.78, 0.84, 0.88])
    stats = EvalStatistics.of(labels, _binary_probs(p1))

    # Execute
    threshold = stats.threshold()

    # Assert: the edge 0.70 separates the classes: balanced accuracy 1 there, 0.5 at 0.5
    assert threshold == pytest.approx(0.70)
    assert stats.metrics_at(threshold) == {"sensitivity": 1.0, "specificity": 1.0, "bal_acc": 1.0}
    assert stats.metrics_at(0.5)["bal_acc"] == 0.5
    assert metrics_at_threshold(labels, _binary_probs(p1), threshold)["bal_acc"] == 1.0


def test_without_both_classes_the_threshold_stays_at_half_and_multi_class_has_none() -> None:
    only_negatives = EvalStatistics.of(np.zeros(5, dtype=int), _binary_probs(np.full(5, 0.3)))
    three = EvalStatistics.of(np.array([0, 1, 2]), np.eye(3))

    assert only_negatives.threshold() == 0.5
    assert three.threshold() is None


def test_noised_counts_move_the_threshold_only_by_more_than_the_noise() -> None:
    # Prepare: 60 negatives at 0.55-0.69, 40 positives at 0.71-0.95: the edge 0.70 separates them
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 40)
    p1 = np.r_[rng.uniform(0.55, 0.69, 60), rng.uniform(0.71, 0.95, 40)]
    exact = EvalStatistics.of(labels, _binary_probs(p1))

    # Execute / Assert: small noise keeps the real gain; noise of the size of the counts leaves 0.5 in place
    assert exact.threshold() == pytest.approx(0.70)
    assert exact.threshold(noise_std=1.0) == pytest.approx(0.70)
    assert exact.threshold(noise_std=15.0) == 0.5
    chosen = [exact.noised(20.0, np.random.default_rng(s)).threshold(noise_std=20.0) for s in range(20)]
    assert chosen.count(0.5) >= 15  # a noised optimum elsewhere rarely clears one standard error


def test_metrics_at_threshold_by_hand() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    p1 = np.array([0.9, 0.6, 0.3, 0.7, 0.1])

    m = metrics_at_threshold(labels, _binary_probs(p1), 0.65)

    # decisions 1,0,0,1,0: tp 1, fn 2, fp 1, tn 1
    assert (m["sensitivity"], m["specificity"], m["acc"]) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    assert m["bal_acc"] == pytest.approx((1 / 3 + 1 / 2) / 2) and m["precision"] == 0.5
    with pytest.raises(ValueError, match="binary"):
        metrics_at_threshold(np.array([0, 1, 2]), np.eye(3), 0.5)


def test_the_coordinator_pools_the_sites_exact_counts_into_one_threshold() -> None:
    # Prepare: two hospitals' exact replies; neither alone has both classes spread like the pool
    rng = np.random.default_rng(0)
    replies = {}
    for site, (labels, p1) in {"a": (np.array([0, 0, 0, 1]), np.array([0.61, 0.66, 0.64, 0.81])),
                               "b": (np.array([1, 1, 0]), np.array([0.76, 0.91, 0.67]))}.items():
        stats = EvalStatistics.of(labels, _binary_probs(p1)).vector()
        counts = {f"{keys.VAL_STAT_PREFIX}{i}": float(v) for i, v in enumerate(stats)}
        replies[site] = {f"{keys.EVAL_PREFIX}auc": float(rng.random()), f"{keys.EVAL_PREFIX}acc": 0.5,
                         keys.N_VAL: len(labels), **counts}

    # Execute
    val = weighted_metrics(site_rounds({}, replies))

    # Assert: the pooled counts (4 negatives <= 0.67, 3 positives >= 0.76) give the edge 0.70, rates 1
    assert val["threshold"] == pytest.approx(0.70)
    assert (val["thr_bal_acc"], val["thr_sensitivity"], val["thr_specificity"]) == (1.0, 1.0, 1.0)
    assert not any(k.startswith("stat-") for k in val)  # the counts are not averaged as metrics


def test_the_test_set_never_moves_the_threshold() -> None:
    # Prepare: a model, a validation-chosen threshold, and the test set with true and with shuffled labels
    cfg = compose_config(["model=scatternet"])
    from medfed.common.models import build_model

    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    images = rng.random((40, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 2, size=40)
    val = {"auc": 0.8, "threshold": 0.35, "thr_bal_acc": 0.7, "thr_sensitivity": 0.6, "thr_specificity": 0.8}

    # Execute
    points = [operating_point(cfg, model, state, ArrayDataset(images, y.astype(np.int64)), val, 3)
              for y in (labels, rng.permutation(labels))]

    # Assert: the same threshold whatever the test labels; its test metrics are computed at it
    assert [p["threshold"] for p in points] == [0.35, 0.35]
    assert all(p["test"]["threshold"] == 0.35 and p["test_at_0.5"]["threshold"] == 0.5 for p in points)
    assert points[0]["val"] == {"bal_acc": 0.7, "sensitivity": 0.6, "specificity": 0.8}
    assert operating_point(cfg, model, state, None, {"auc": 0.8}, 3) is None
