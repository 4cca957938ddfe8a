"""Self-supervised training on real images (BreastMNIST when the shared file is here, else the synthetic task): the
pretext losses fall, and MIM trains under Opacus DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfed.client.training import DPTraining, train_epochs
from medfed.common.config import SSLConfig, TrainConfig, compose_config
from medfed.common.data import ArrayDataset
from medfed.common.models.ssl import MeanLoss, build_ssl_model, ssl_loss
from tests.unit.common.test_ssl import _images


@pytest.mark.parametrize("method", ["simclr", "mim"])
def test_the_ssl_loss_decreases_on_real_images(method):
    torch.manual_seed(0)
    images = _images()
    train, held = images[:160], images[160:]
    cfg = compose_config(["model.width=8"])
    model = build_ssl_model(cfg.model, SSLConfig(method=method), spatial_dims=2, in_channels=1)
    before = ssl_loss(model, held, seed=1)

    train_epochs(model, ArrayDataset(train, np.zeros(len(train), dtype=np.int64)), TrainConfig(batch_size=32, lr=3e-3),
                 epochs=6, n_classes=2, spatial_dims=2, seed=0, device=torch.device("cpu"), criterion=MeanLoss())

    after = ssl_loss(model, held, seed=1)
    assert after < before
    assert ssl_loss(model, held, seed=1) == after  # seeded: the same masks/views every evaluation


def test_mim_trains_under_dp_with_per_sample_gradients():
    from opacus.validators import ModuleValidator

    cfg = compose_config(["model.width=8", "task=ssl", "ssl.method=mim", "privacy=dp"])
    model = build_ssl_model(cfg.model, cfg.ssl, spatial_dims=2, in_channels=1)
    images = _images(64)

    result = train_epochs(model, ArrayDataset(images, np.zeros(64, dtype=np.int64)), TrainConfig(batch_size=16),
                          epochs=1, n_classes=2, spatial_dims=2, seed=0, device=torch.device("cpu"),
                          criterion=MeanLoss(),
                          privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=16,
                                             grad_sample_mode="hooks", secure_mode=False))

    assert ModuleValidator.validate(model, strict=False) == []
    assert result.steps > 0 and math.isfinite(result.loss)
