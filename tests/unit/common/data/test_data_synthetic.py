"""Tests of common.data.synthetic: determinism, shapes for 2D/3D/colour, scanner styles."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.config import SyntheticConfig
from medfed.common.data.synthetic import load_synthetic, scanner_effect


@pytest.mark.parametrize(
    ("kwargs", "train_shape"),
    [
        ({}, (1200, 1, 28, 28)),
        ({"channels": 3, "n_train": 50, "n_test": 10}, (50, 3, 28, 28)),
        ({"spatial_dims": 3, "n_train": 40, "n_test": 10, "image_size": 16}, (40, 1, 16, 16, 16)),
        ({"n_classes": 5, "image_size": 8, "n_train": 100, "n_test": 20}, (100, 1, 8, 8)),
    ],
)
def test_shapes_dtypes_and_range(kwargs: dict[str, int], train_shape: tuple[int, ...]) -> None:
    # Prepare
    cfg = SyntheticConfig(**kwargs)

    # Execute
    splits = load_synthetic(cfg)

    # Assert
    assert splits.train.images.shape == train_shape
    assert splits.test.images.shape == (cfg.n_test, *train_shape[1:])
    for data in (splits.train, splits.test):
        assert data.images.dtype == np.float32 and data.labels.dtype == np.int64
        assert 0.0 <= data.images.min() and data.images.max() <= 1.0
        assert set(np.unique(data.labels)) == set(range(cfg.n_classes))
    assert (splits.info.n_classes, splits.info.channels) == (cfg.n_classes, cfg.channels)
    assert (splits.info.spatial_dims, splits.info.image_size) == (cfg.spatial_dims, cfg.image_size)
    assert splits.info.simulate_scanners


def test_same_seed_same_data_other_seed_other_data() -> None:
    # Execute
    a = load_synthetic(SyntheticConfig(n_train=64, n_test=16, seed=3))
    b = load_synthetic(SyntheticConfig(n_train=64, n_test=16, seed=3))
    c = load_synthetic(SyntheticConfig(n_train=64, n_test=16, seed=4))

    # Assert
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)


def test_lesion_classes_are_brighter_on_average() -> None:
    # Prepare
    splits = load_synthetic(SyntheticConfig(n_train=400, n_test=10))
    peak = splits.train.images.reshape(400, -1).max(axis=1)

    # Execute
    gap = peak[splits.train.labels == 1].mean() - peak[splits.train.labels == 0].mean()

    # Assert
    assert gap > 0.1


def test_scanner_effect_differs_between_sites_and_is_deterministic() -> None:
    # Prepare
    images = load_synthetic(SyntheticConfig(n_train=32, n_test=8)).train.images

    # Execute
    site0 = scanner_effect(images, 0, seed=0)
    site0_again = scanner_effect(images, 0, seed=0)
    site1 = scanner_effect(images, 1, seed=0)

    # Assert
    assert np.array_equal(site0, site0_again)
    assert np.abs(site0 - site1).mean() > 0.01
    for out in (site0, site1):
        assert out.dtype == np.float32 and out.shape == images.shape
        assert 0.0 <= out.min() and out.max() <= 1.0
    assert images.min() >= 0.0  # the input is not modified in place
    assert not np.shares_memory(site0, images)
