"""The training core (no Flower): sample counts, class weights, the round's learning rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.client.training import class_weights, make_optimizer, train_epochs
from medfed.common.config import compose_config
from medfed.common.data import ArrayDataset
from medfed.common.models import build_model


def _data(n: int = 70) -> ArrayDataset:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.2 + labels[:, None, None, None] * 0.5
    return ArrayDataset(images=images.astype(np.float32), labels=labels)


def test_num_examples_counts_samples_not_batches_and_loss_drops():
    # Prepare
    cfg = compose_config(["train.batch_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)

    # Execute
    first = train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=1)
    later = train_epochs(model, _data(), cfg.train, epochs=3, n_classes=2, spatial_dims=2, seed=2)

    # Assert
    assert first.num_examples == 70 and first.steps == 3  # 3 batches of up to 32, but 70 samples
    assert later.loss < first.loss


def test_balanced_class_weights_by_hand():
    # counts 3 and 1 of 4: weights 4 / (2 * 3) and 4 / (2 * 1)
    weights = class_weights(np.array([0, 0, 0, 1]), 3, "balanced")
    np.testing.assert_allclose(weights.numpy(), [4 / 6, 2.0, 1.0], rtol=1e-6)
    assert class_weights(np.array([0, 1]), 2, "none") is None


def test_round_learning_rate_reaches_the_optimizer():
    # Prepare
    cfg = compose_config(["train.lr_schedule=cosine", "train.rounds=4"])
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    optimizer = make_optimizer(model, cfg.train)

    # Execute
    train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=0,
                 lr=cfg.train.round_lr(4), optimizer=optimizer)

    # Assert
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * cfg.train.lr_min_factor)


def test_same_seed_same_weights():
    cfg = compose_config([])
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
        train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=5)
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_dp_batches_are_fetched_whole_and_may_be_empty():
    # DP-SGD's Poisson sampling fetches a batch's indices at once, and may draw an empty batch
    from medfed.client.training import _BatchedTensors

    images = np.arange(4 * 1 * 2 * 2, dtype=np.float32).reshape(4, 1, 2, 2)
    data = _BatchedTensors(ArrayDataset(images=images, labels=np.array([0, 1, 0, 1])))

    x, y = data.__getitems__([2, 0])
    empty_x, empty_y = data.__getitems__([])

    np.testing.assert_array_equal(x.numpy(), images[[2, 0]])
    assert y.tolist() == [0, 0]
    assert tuple(empty_x.shape) == (0, 1, 2, 2) and tuple(empty_y.shape) == (0,)
