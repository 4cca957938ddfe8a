"""Tests of common.inference: probabilities, mode restoration, evaluation keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.common.config import ModelConfig
from medfed.common.inference import evaluate, predict_proba
from medfed.common.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(n_classes: int = 3, dropout: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(name="smallcnn", width=4, dropout=dropout), spatial_dims=2, in_channels=1, n_classes=n_classes
    )


def _images(n: int = 10) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 1, 28, 28)).astype(np.float32)


def test_predict_proba_rows_sum_to_one() -> None:
    # Prepare
    model = _model()

    # Execute
    probs = predict_proba(model, _images(), batch_size=4)

    # Assert
    assert probs.shape == (10, 3)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert (probs >= 0).all()


def test_predict_proba_is_deterministic_and_batch_independent() -> None:
    # Prepare
    model = _model(dropout=0.5)
    images = _images()

    # Execute
    small = predict_proba(model, images, batch_size=3)
    large = predict_proba(model, images, batch_size=256)

    # Assert: dropout off in eval mode, and batching does not change the result
    np.testing.assert_allclose(small, large, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_predict_proba_restores_modes(training: bool) -> None:
    # Prepare: a mixed state, as in linear probing with a frozen encoder
    model = _model()
    model.train(training)
    model.encoder.eval()
    before = {name: m.training for name, m in model.named_modules()}

    # Execute
    predict_proba(model, _images(2))

    # Assert
    assert {name: m.training for name, m in model.named_modules()} == before


def test_evaluate_returns_metric_keys() -> None:
    # Prepare
    model = _model(n_classes=2)
    labels = np.array([0, 1] * 5)

    # Execute
    metrics = evaluate(model, _images(), labels, batch_size=4)

    # Assert
    assert {"auc", "acc", "bal_acc", "f1", "n", "loss", "sensitivity", "specificity", "precision"} <= set(metrics)
    assert metrics["n"] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size=0"),
        ({"images": np.zeros((0, 1, 28, 28), dtype=np.float32)}, "empty"),
        ({"images": np.zeros((28, 28), dtype=np.float32)}, r"shape \(N, C, H, W\)"),
    ],
)
def test_predict_proba_ill_cases(kwargs: dict[str, object], match: str) -> None:
    # Prepare
    args: dict[str, object] = {"images": _images(2)} | kwargs

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        predict_proba(_model(), **args)  # type: ignore[arg-type]


def test_evaluate_label_count_mismatch() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="labels has 3 entries but images has 10"):
        evaluate(_model(), _images(), np.array([0, 1, 0]))
