"""Temperature scaling, reliability sums, ROC points, MC dropout, ensembles, referral and Grad-CAM: the pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfed.common.calibration import TEMPERATURES, fit_temperature, nll_sums
from medfed.common.config import ModelConfig
from medfed.common.errors import ConfigError
from medfed.common.explain import default_target_layer, gradcam_maps, save_explanations
from medfed.common.inference import predict_logits, softmax
from medfed.common.metrics import (
    ece_from_sums,
    expected_calibration_error,
    reliability_bins,
    reliability_sums,
    roc_auc,
    roc_curve,
)
from medfed.common.models import build_model
from medfed.common.uncertainty import mc_dropout_proba, mean_proba, predictive_entropy, referral_curve


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated probabilities, and logits 4 x too sharp (an over-confident model)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 1.5, size=(n, 2))
    labels = (rng.random(n) < softmax(true_logits)[:, 1]).astype(np.int64)
    return 4.0 * true_logits, labels


def test_nll_sums_by_hand_and_the_fit_takes_the_least():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0])

    sums = nll_sums(logits, labels, [1.0, 2.0])

    expected_t1 = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))
    expected_t2 = -math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(1 / (1 + math.exp(0.5)))
    assert sums == pytest.approx([expected_t1, expected_t2])
    assert fit_temperature([3.0, 1.0, 2.0], [0.5, 1.0, 2.0]) == 1.0
    assert fit_temperature([1.0, 2.0, 1.0], [0.5, 1.0, 2.0]) in (0.5, 2.0)
    assert fit_temperature([math.nan, 2.0, 1.0], [0.5, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="no finite NLL"):
        fit_temperature([math.nan] * 3, [0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="labels must lie"):
        nll_sums(logits, np.array([0, 2]))


def test_temperature_scaling_fitted_on_validation_reduces_test_ece_of_an_overconfident_model():
    # Prepare: three hospitals' validation splits and a separate test set, all from one over-confident model
    sites = [_overconfident(300, seed) for seed in (1, 2, 3)]
    test_logits, test_labels = _overconfident(2000, 9)

    # Execute: each hospital sums its NLL per temperature; the coordinator adds them up and picks
    totals = np.sum([nll_sums(z, y) for z, y in sites], axis=0)
    temperature = fit_temperature(totals)

    # Assert: a temperature near the 4x sharpening is found, and the held-out ECE falls
    assert 2.5 <= temperature <= 6.0
    before = expected_calibration_error(test_labels, softmax(test_logits))
    after = expected_calibration_error(test_labels, softmax(test_logits, temperature))
    assert after < 0.5 * before
    assert 1.0 in TEMPERATURES


def test_reliability_sums_of_the_sites_add_up_to_the_pooled_data():
    parts = [_overconfident(n, seed) for n, seed in ((50, 1), (120, 2), (7, 3))]
    pooled_labels = np.concatenate([y for _, y in parts])
    pooled_probs = np.concatenate([softmax(z) for z, _ in parts])

    summed = sum(reliability_sums(y, softmax(z)) for z, y in parts)

    assert ece_from_sums(summed) == pytest.approx(expected_calibration_error(pooled_labels, pooled_probs))
    assert [b["count"] for b in reliability_bins(pooled_labels, pooled_probs)] == list(summed[0])
    assert math.isnan(ece_from_sums(np.zeros((3, 15))))


def test_roc_points_integrate_to_the_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels * 0.6 + rng.random(200), 1)  # ties included

    fpr, tpr = roc_curve(labels, scores)

    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.ones(3), np.arange(3.0))


def _model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="smallcnn", width=8, dropout=dropout), spatial_dims=2, in_channels=1,
                       n_classes=2)


def test_mc_dropout_passes_differ_and_repeat_with_the_seed():
    model = _model(0.5).eval()
    images = np.random.default_rng(0).random((6, 1, 16, 16)).astype(np.float32)
    state_before = torch.random.get_rng_state()

    passes = mc_dropout_proba(model, images, samples=8, seed=3)
    again = mc_dropout_proba(model, images, samples=8, seed=3)

    assert passes.shape == (8, 6, 2)
    assert passes.var(axis=0).mean() > 0.0  # the passes disagree
    assert np.array_equal(passes, again)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's random stream is untouched
    assert not model.training and not model.dropout.training
    deterministic = predict_logits(model, images)
    assert np.array_equal(deterministic, predict_logits(model, images))
    with pytest.raises(ConfigError, match="model.dropout"):
        mc_dropout_proba(_model(0.0), images, samples=4, seed=0)


def test_ensemble_mean_and_entropy():
    a = np.array([[1.0, 0.0], [0.5, 0.5]])
    b = np.array([[0.0, 1.0], [0.5, 0.5]])

    mean = mean_proba([a, b])

    assert np.allclose(mean, 0.5)
    assert predictive_entropy(mean) == pytest.approx([math.log(2)] * 2)
    assert predictive_entropy(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same images"):
        mean_proba([a, b[:1]])


def test_referring_the_uncertain_cases_keeps_the_right_count_and_raises_accuracy():
    # Prepare: 100 images, the 20 the model gets wrong are also its least certain ones
    labels = np.array([0, 1] * 50)
    probs = np.tile([0.1, 0.9], (100, 1))
    probs[labels == 0] = [0.9, 0.1]
    wrong = np.arange(0, 100, 5)
    probs[wrong] = probs[wrong][:, ::-1] * 0 + [0.45, 0.55]
    probs[wrong[labels[wrong] == 1]] = [0.55, 0.45]

    curve = referral_curve(labels, probs, predictive_entropy(probs), [0.0, 0.1, 0.2])

    assert [c["kept"] for c in curve] == [100, 90, 80]
    assert curve[0]["acc"] == pytest.approx(0.8)
    assert curve[1]["acc"] > curve[0]["acc"] and curve[2]["acc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="out of range"):
        referral_curve(labels, probs, predictive_entropy(probs), [1.0])


@pytest.mark.parametrize(("name", "dims", "layer"), [("smallcnn", 2, "encoder.block3_1"),
                                                      ("resnet18", 2, "encoder.layer4"),
                                                      ("smallcnn", 3, "encoder.block3_1")])
def test_gradcam_maps_have_the_image_shape_and_leave_no_gradients(tmp_path, name, dims, layer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), spatial_dims=dims, in_channels=1, n_classes=2)
    images = np.random.default_rng(0).random((3, 1, *([16] * dims))).astype(np.float32)

    maps = gradcam_maps(model, images)
    written = save_explanations(tmp_path / "maps", images, maps, ["a", "b", "c"], softmax(predict_logits(model, images)))

    assert default_target_layer(model) == layer
    assert maps.shape == (3, *([16] * dims))
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() > 0.0
    assert all(p.grad is None for p in model.parameters()) and model.training  # flags as they were (a new model trains)
    assert [p.name for p in written] == ["a.png", "b.png", "c.png"]
    assert np.array_equal(np.load(tmp_path / "maps" / "b.npy"), maps[1])
    assert (tmp_path / "maps" / "index.csv").read_text().count("\n") == 4
    with pytest.raises(ConfigError, match="not a module"):
        gradcam_maps(model, images, target_layer="encoder.nope")
