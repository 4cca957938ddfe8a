"""Tests of common.metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfed.common.metrics import classification_metrics, finite_or_none, roc_auc


def _probs_for(pred: list[int], n_classes: int) -> np.ndarray:
    """Probabilities whose argmax is ``pred`` (0.7 on the predicted class, the rest shared)."""
    probs = np.full((len(pred), n_classes), 0.3 / (n_classes - 1))
    probs[np.arange(len(pred)), pred] = 0.7
    return probs


@pytest.mark.parametrize(
    ("y", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [0.5, 0.5], 0.5),  # a tie counts one half
        ([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9], 0.875),  # (1 + 0.5 + 1 + 1) / 4
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # inverted
        ([1, 0, 1, 0, 1], [3.0, 1.0, 2.0, 2.0, 1.0], (1 + 1 + 1 + 0.5 + 0.5 + 0) / 6),  # ties: 1/2 each
        ([True, False], [0.7, 0.2], 1.0),
    ],
)
def test_roc_auc_hand_computed(y: list[int], scores: list[float], expected: float) -> None:
    # Execute
    auc = roc_auc(np.asarray(y), np.asarray(scores))

    # Assert
    assert isinstance(auc, float)
    assert auc == pytest.approx(expected)


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1]])
def test_roc_auc_single_class_is_nan(y: list[int]) -> None:
    # Execute
    auc = roc_auc(np.asarray(y), np.linspace(0, 1, len(y)))

    # Assert
    assert math.isnan(auc)


@pytest.mark.parametrize(
    ("y", "scores", "match"),
    [
        ([], [], "empty"),
        ([0, 1], [0.5], "must match"),
        ([0, 2], [0.1, 0.2], "only 0 and 1"),
        ([0, 1], [0.1, float("nan")], "nan or inf"),
    ],
)
def test_roc_auc_ill_cases(y: list[int], scores: list[float], match: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        roc_auc(np.asarray(y, dtype=int), np.asarray(scores, dtype=float))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties

    # Execute
    auc = roc_auc(y, scores)

    # Assert
    assert auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


@pytest.mark.parametrize(("seed", "n_classes"), [(0, 2), (1, 3), (2, 5)])
def test_classification_auc_matches_sklearn(seed: int, n_classes: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=300)
    logits = rng.normal(size=(300, n_classes))
    logits[np.arange(300), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = (
        roc_auc_score(y, probs[:, 1]) if n_classes == 2 else roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )

    # Execute
    metrics = classification_metrics(y, probs)

    # Assert
    assert metrics["auc"] == pytest.approx(expected, abs=1e-12)


def test_binary_metrics_from_confusion_matrix() -> None:
    # Prepare: TP=3, FN=1, FP=1, TN=5
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    pred = [1, 1, 0, 0, 0, 1, 0, 1, 0, 0]

    # Execute
    metrics = classification_metrics(y, _probs_for(pred, 2))

    # Assert
    assert metrics["acc"] == pytest.approx(0.8)
    assert metrics["sensitivity"] == pytest.approx(3 / 4)
    assert metrics["specificity"] == pytest.approx(5 / 6)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["bal_acc"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert metrics["f1"] == pytest.approx((6 / 8 + 10 / 12) / 2)
    assert metrics["n"] == 10.0
    assert metrics["loss"] == pytest.approx(-(8 * math.log(0.7) + 2 * math.log(0.3)) / 10)
    assert all(type(v) is float for v in metrics.values())


def test_multiclass_metrics_from_confusion_matrix() -> None:
    # Prepare: recalls 1/2, 1, 1/2; F1s 1/2, 4/5, 2/3
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = [0, 1, 1, 1, 0, 2]

    # Execute
    metrics = classification_metrics(y, _probs_for(pred, 3))

    # Assert
    assert set(metrics) == {"auc", "acc", "bal_acc", "f1", "n", "loss", "ece"}
    assert metrics["acc"] == pytest.approx(4 / 6)
    assert metrics["bal_acc"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_class_only_predicted_counts_in_f1_not_in_bal_acc() -> None:
    # Prepare: class 2 is predicted once but never true
    y = np.array([0, 0, 1])
    pred = [0, 2, 1]

    # Execute
    metrics = classification_metrics(y, _probs_for(pred, 3))

    # Assert
    assert metrics["bal_acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["auc"] == pytest.approx(np.mean([roc_auc(y == 0, _probs_for(pred, 3)[:, 0]), 1.0]))


def test_single_class_present_gives_nan_where_undefined() -> None:
    # Prepare: no positives, one false positive
    y = np.array([0, 0, 0])
    pred = [0, 1, 0]

    # Execute
    metrics = classification_metrics(y, _probs_for(pred, 2))

    # Assert
    assert math.isnan(metrics["auc"])
    assert math.isnan(metrics["sensitivity"])
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["precision"] == 0.0
    assert metrics["acc"] == pytest.approx(2 / 3)


def test_precision_nan_without_predicted_positives() -> None:
    # Execute
    metrics = classification_metrics(np.array([0, 1]), _probs_for([0, 0], 2))

    # Assert
    assert math.isnan(metrics["precision"])
    assert metrics["sensitivity"] == 0.0


def test_loss_clips_zero_probabilities() -> None:
    # Prepare
    probs = np.array([[1.0, 0.0], [0.4, 0.6]])

    # Execute
    metrics = classification_metrics(np.array([1, 1]), probs)

    # Assert
    assert metrics["loss"] == pytest.approx((-math.log(1e-12) - math.log(0.6)) / 2)


def test_labels_of_shape_n_by_1_are_accepted() -> None:
    # Execute
    metrics = classification_metrics(np.array([[0], [1]]), _probs_for([0, 1], 2))

    # Assert
    assert metrics["acc"] == 1.0
    assert metrics["auc"] == 1.0


@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        (np.array([], dtype=int), np.zeros((0, 2)), "empty"),
        (np.array([0, 1]), np.zeros((3, 2)), r"shape \(N, C\)"),
        (np.array([0, 1]), np.full((2, 1), 1.0), r"C >= 2"),
        (np.array([0, 3]), np.full((2, 3), 1 / 3), r"labels must lie in \[0, 2\]"),
        (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), "nan or inf"),
    ],
)
def test_classification_metrics_ill_cases(y: np.ndarray, probs: np.ndarray, match: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs)


def test_finite_or_none() -> None:
    # Prepare
    metrics = {"auc": float("nan"), "acc": 0.5, "loss": float("inf"), "n": np.float64(3.0)}

    # Execute
    out = finite_or_none(metrics)

    # Assert
    assert out == {"auc": None, "acc": 0.5, "loss": None, "n": 3.0}
    assert type(out["n"]) is float


def test_expected_calibration_error_by_hand():
    # Prepare: 5 images, 2 classes; top-class confidences 0.9, 0.9, 0.6, 0.6, 0.55 in 15 bins of width 1/15:
    # 0.9 -> bin 13 (0.8667, 0.9333]; 0.6 -> bin 8 (0.5333, 0.6]; 0.55 -> bin 8 too
    from medfed.common.metrics import expected_calibration_error, reliability_bins

    probs = np.array([[0.1, 0.9], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([1, 1, 1, 1, 0])  # correct: yes, no, yes, no, no

    # Execute
    table = reliability_bins(labels, probs)
    ece = expected_calibration_error(labels, probs)

    # Assert: bin 13: confidence 0.9, accuracy 0.5; bin 8: confidence (0.6 + 0.6 + 0.55) / 3, accuracy 1/3
    assert table[13]["count"] == 2 and table[13]["accuracy"] == pytest.approx(0.5)
    assert table[8]["count"] == 3 and table[8]["confidence"] == pytest.approx(1.75 / 3)
    assert sum(b["count"] for b in table) == 5 and np.isnan(table[0]["accuracy"])
    expected = (2 * abs(0.5 - 0.9) + 3 * abs(1 / 3 - 1.75 / 3)) / 5
    assert ece == pytest.approx(expected)
    assert classification_metrics(labels, probs)["ece"] == pytest.approx(expected)


def test_a_perfectly_calibrated_certain_model_has_zero_ece():
    from medfed.common.metrics import expected_calibration_error

    probs = np.array([[1.0, 0.0], [0.0, 1.0]] * 5)
    assert expected_calibration_error(np.array([0, 1] * 5), probs) == 0.0
