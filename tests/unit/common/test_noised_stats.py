"""Noised sufficient statistics of a validation split: without noise they give medfed's metrics; one image moves
them by at most the stated sensitivity; the noise has the stated scale and does not follow any seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.common.metrics import classification_metrics
from medfed.common.noised_stats import (
    NLL_CLIP,
    SCORE_BINS,
    EvalStatistics,
    gaussian_release,
    noise_rng,
    pooled,
    statistics_from_metrics,
)


def _binary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    centre = (rng.integers(0, SCORE_BINS, size=n) + 0.5) / SCORE_BINS  # scores at bin centres: binning is exact
    shifted = np.clip(centre + 0.3 * (labels - 0.5), 0.025, 0.975)
    p1 = (np.floor(shifted * SCORE_BINS) + 0.5) / SCORE_BINS
    return labels, np.stack([1 - p1, p1], axis=1)


def _multi(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def test_binary_statistics_without_noise_give_the_exact_metrics():
    labels, probs = _binary(300)

    got = EvalStatistics.of(labels, probs).metrics()

    exact = classification_metrics(labels, probs)
    for key in ("auc", "acc", "sensitivity", "specificity", "precision", "bal_acc", "f1", "loss", "n"):
        assert got[key] == pytest.approx(exact[key], abs=1e-9), key
    assert got["ece"] == pytest.approx(exact["ece"], abs=0.03)  # bin centres stand in for the confidences


def test_multiclass_statistics_without_noise_give_the_exact_counts_and_nearly_the_auc():
    labels, probs = _multi(400, 4)

    got = EvalStatistics.of(labels, probs).metrics()

    exact = classification_metrics(labels, probs)
    for key in ("acc", "bal_acc", "f1", "ece", "n"):
        assert got[key] == pytest.approx(exact[key], abs=1e-9), key
    assert got["auc"] == pytest.approx(exact["auc"], abs=0.01)  # 20 score bins per class
    assert got["loss"] == pytest.approx(exact["loss"], rel=0.02)  # NLL clipped at ln 100


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_one_image_moves_the_statistics_by_at_most_the_sensitivity(n_classes):
    # every image of a split (and confident, wrong ones that hit the NLL clip) against the stated bound
    labels, probs = _binary(200, seed=1) if n_classes == 2 else _multi(200, n_classes, seed=1)
    probs[:5] = np.roll(np.eye(n_classes), 1, axis=1)[labels[:5]] * 0.999999 + 1e-7  # certain and wrong
    bound = EvalStatistics.sensitivity(n_classes)

    norms = [np.linalg.norm(EvalStatistics.of(labels[i:i + 1], probs[i:i + 1]).vector()) for i in range(200)]

    assert max(norms) <= bound + 1e-9
    assert max(norms) > 0.9 * bound  # and the bound is not loose: removing the bound would be noticed


def test_the_vector_round_trips_and_pools_by_summing():
    labels, probs = _multi(100, 3)
    a = EvalStatistics.of(labels[:60], probs[:60])
    b = EvalStatistics.of(labels[60:], probs[60:])

    total = pooled([a, EvalStatistics.from_vector(3, b.vector())])

    assert total is not None
    np.testing.assert_allclose(total.vector(), EvalStatistics.of(labels, probs).vector())
    assert total.vector().size == EvalStatistics.size(3)


def test_the_noise_has_the_stated_scale_and_follows_no_seed():
    stats = EvalStatistics.of(*_binary(50))
    draws = np.stack([stats.noised(5.0, noise_rng()).vector() - stats.vector() for _ in range(400)])

    assert draws.std() == pytest.approx(5.0 * math.sqrt(2), rel=0.05)
    assert abs(draws.mean()) < 0.2
    assert not np.array_equal(draws[0], draws[1])  # fresh entropy each time: the coordinator cannot predict it


def test_a_constant_model_no_longer_reveals_the_class_counts():
    # the attack: a model that puts every image in one score bin turns the histogram into the class counts
    labels = np.array([0] * 6 + [1] * 34)
    probs = np.tile([0.3, 0.7], (40, 1))
    exact = EvalStatistics.of(labels, probs)
    assert exact.histograms[0, 1].sum() == 34  # what an exact release would give away

    noised = [exact.noised(5.0, noise_rng()).histograms[0, 0, 14] for _ in range(200)]

    assert np.std(noised) == pytest.approx(5.0 * math.sqrt(2), rel=0.15)  # the rare class's count, blurred


def test_noised_metrics_stay_within_their_ranges():
    stats = EvalStatistics.of(*_binary(10))
    for _ in range(50):
        metrics = stats.noised(5.0, noise_rng()).metrics()
        for key in ("auc", "acc", "sensitivity", "specificity", "precision", "bal_acc", "f1"):
            assert math.isnan(metrics[key]) or 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
        assert metrics["n"] >= 0


def test_statistics_travel_as_scalar_metrics():
    stats = EvalStatistics.of(*_binary(30))
    metrics = {f"dp-stat-{i}": float(v) for i, v in enumerate(stats.vector())}
    metrics["dp-classes"] = 2

    back = statistics_from_metrics(metrics, "dp-stat-", "dp-classes")

    assert back is not None
    np.testing.assert_allclose(back.vector(), stats.vector())
    assert statistics_from_metrics({k: v for k, v in metrics.items() if k != "dp-stat-3"}, "dp-stat-",
                                   "dp-classes") is None
    assert statistics_from_metrics({"val-auc": 0.8}, "dp-stat-", "dp-classes") is None


def test_a_release_refuses_zero_noise():
    with pytest.raises(ValueError, match="noise_multiplier > 0"):
        gaussian_release(np.zeros(3), 1.0, 0.0, noise_rng())


def test_the_nll_is_clipped_per_image():
    labels = np.array([1])
    probs = np.array([[1 - 1e-9, 1e-9]])  # NLL about 20.7, clipped to ln 100

    stats = EvalStatistics.of(labels, probs)

    assert stats.nll == pytest.approx(1.0)
    assert stats.metrics()["loss"] == pytest.approx(NLL_CLIP)
