"""Tests of common.data.transforms: batch and MONAI per-image augmentation in 2D and 3D, torch views of ArrayDataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfed.common.config import AugmentConfig
from medfed.common.data.arrays import ArrayDataset
from medfed.common.data.transforms import (
    BatchAugmentation,
    build_augmentation,
    build_batch_augmentation,
    to_tensor_dataset,
)
from medfed.common.errors import ConfigError


def _data(shape: tuple[int, ...], n: int = 4) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(images=rng.random((n, *shape), dtype=np.float32), labels=np.arange(n, dtype=np.int64) % 2)


def test_disabled_augmentation_is_none() -> None:
    # Execute / Assert
    assert build_augmentation(AugmentConfig(enabled=False), 2) is None


@pytest.mark.parametrize(("shape", "dims"), [((1, 28, 28), 2), ((3, 28, 28), 2), ((1, 16, 16, 16), 3)])
def test_augmentation_keeps_shape_and_dtype_and_changes_the_image(shape: tuple[int, ...], dims: int) -> None:
    # Prepare
    augment = build_augmentation(AugmentConfig(enabled=True, prob=1.0, flip_prob=1.0), dims, seed=0)
    image = torch.from_numpy(_data(shape).images[0].copy())
    original = image.clone()

    # Execute
    out = augment(image)

    # Assert
    assert type(out) is torch.Tensor
    assert out.shape == image.shape and out.dtype == torch.float32
    assert not torch.allclose(out, original)
    assert torch.equal(image, original)  # the input is not modified in place


def test_augmentation_is_reproducible_by_seed() -> None:
    # Prepare
    image = torch.from_numpy(_data((1, 28, 28)).images[0].copy())
    cfg = AugmentConfig(enabled=True, prob=1.0)

    # Execute
    a = build_augmentation(cfg, 2, seed=1)(image)
    b = build_augmentation(cfg, 2, seed=1)(image)

    # Assert
    assert torch.equal(a, b)


def test_tensor_dataset_shares_memory() -> None:
    # Prepare
    data = _data((1, 8, 8))

    # Execute
    tensors = to_tensor_dataset(data)

    # Assert
    images, labels = tensors.tensors
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert np.shares_memory(images.numpy(), data.images)


def test_augmentation_pickles() -> None:
    # Prepare
    import pickle

    augment = build_augmentation(AugmentConfig(enabled=True, prob=1.0), 3, seed=0)
    image = torch.rand(1, 8, 8, 8)

    # Execute
    clone = pickle.loads(pickle.dumps(augment))

    # Assert
    assert clone(image).shape == (1, 8, 8, 8)


# --- BatchAugmentation: train.augment at every training step -------------------------------------------------------


def _fixed_draws(augment: BatchAugmentation, rotate_deg: float, zoom: float) -> None:
    """Make every draw the same: each angle ``rotate_deg``, each zoom factor ``zoom`` (the test's own geometry)."""
    widths = iter([math.radians(rotate_deg), zoom - 1])

    def uniform(n: int, half_width: float, *shape: int) -> torch.Tensor:
        return torch.full((n, *shape), next(widths), dtype=torch.float64)

    augment._uniform = uniform  # type: ignore[method-assign]


def _spot(shape: tuple[int, ...], at: tuple[int, ...]) -> torch.Tensor:
    image = torch.zeros((1, 1, *shape))
    image[(0, 0, *at)] = 1.0
    return image


def _centre_distance(image: torch.Tensor) -> float:
    """The distance in pixels of the image's centre of mass from the image's centre."""
    weights = image[0, 0].clamp(min=0)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in weights.shape], indexing="ij")
    centre = torch.stack([(g * weights).sum() / weights.sum() for g in grids])
    return float(centre.norm())


def test_batch_augmentation_is_none_when_disabled_and_refuses_other_dimensions() -> None:
    # Execute / Assert
    assert build_batch_augmentation(AugmentConfig(enabled=False), 2) is None
    with pytest.raises(ConfigError, match="spatial_dims=4"):
        BatchAugmentation(AugmentConfig(enabled=True), 4)
    with pytest.raises(ValueError, match=r"got \(2, 28, 28\)"):
        BatchAugmentation(AugmentConfig(enabled=True), 2)(torch.zeros(2, 28, 28))


@pytest.mark.parametrize(("shape", "dims"), [((8, 1, 28, 28), 2), ((8, 3, 20, 36), 2), ((4, 1, 12, 16, 20), 3)])
def test_batch_augmentation_keeps_shape_draws_per_image_and_leaves_the_batch_alone(
    shape: tuple[int, ...], dims: int
) -> None:
    # Prepare
    images = torch.rand(shape)
    original = images.clone()
    augment = build_batch_augmentation(AugmentConfig(enabled=True, prob=1.0), dims, seed=0)
    assert augment is not None

    # Execute
    out = augment(images)

    # Assert
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.equal(images, original)  # a new tensor: the loaded batch is not modified in place
    changes = [(out[i] - images[i]).abs().mean() for i in range(shape[0])]
    assert all(c > 0 for c in changes)
    assert len({round(float(c), 6) for c in changes}) == shape[0]  # each image its own draws


def test_batch_augmentation_is_reproducible_by_seed_and_differs_between_seeds() -> None:
    # Prepare
    images = torch.rand(16, 1, 28, 28)
    cfg = AugmentConfig(enabled=True)

    # Execute
    a, b, c = (BatchAugmentation(cfg, 2, seed=s)(images) for s in (1, 1, 2))

    # Assert
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_augmentation_with_every_probability_zero_returns_the_images() -> None:
    # Prepare
    images = torch.rand(4, 1, 10, 14)
    cfg = AugmentConfig(enabled=True, flip_prob=0.0, prob=0.0)

    # Execute
    out = BatchAugmentation(cfg, 2)(images)

    # Assert
    assert torch.equal(out, images) and out is not images


def test_batch_augmentation_flips_every_axis_when_flip_prob_is_one() -> None:
    # Prepare
    images = torch.rand(3, 2, 6, 7, 8)
    cfg = AugmentConfig(enabled=True, flip_prob=1.0, prob=0.0)

    # Execute
    out = BatchAugmentation(cfg, 3)(images)

    # Assert
    assert torch.equal(out, images.flip(2, 3, 4))


def test_batch_augmentation_at_zero_degrees_and_zoom_one_resamples_to_the_same_image() -> None:
    # Prepare
    images = torch.rand(2, 1, 9, 13)
    augment = BatchAugmentation(AugmentConfig(enabled=True, flip_prob=0.0, prob=1.0, intensity=0.0), 2)
    _fixed_draws(augment, rotate_deg=0.0, zoom=1.0)

    # Execute
    out = augment(images)

    # Assert
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "at", "dims"), [((21, 41), (4, 12), 2), ((15, 21, 31), (4, 8, 20), 3)])
def test_batch_augmentation_rotates_about_the_centre_in_pixel_units_on_non_square_images(
    shape: tuple[int, ...], at: tuple[int, ...], dims: int
) -> None:
    # Prepare: a bright spot off the centre of an image whose sides differ
    image = _spot(shape, at)
    augment = BatchAugmentation(AugmentConfig(enabled=True, flip_prob=0.0, prob=1.0, rotate_deg=30.0, scale=0.5,
                                              intensity=0.0), dims)
    _fixed_draws(augment, rotate_deg=30.0, zoom=1.0)

    # Execute
    out = augment(image)

    # Assert: the spot moved, at the same distance from the centre (a rotation, not a shear of the aspect ratio)
    assert not torch.allclose(out, image)
    assert _centre_distance(out) == pytest.approx(_centre_distance(image), rel=0.03)


def test_batch_augmentation_zoom_moves_a_spot_away_from_the_centre_by_its_factor() -> None:
    # Prepare
    image = _spot((41, 41), (20, 28))  # 8 pixels right of the centre
    augment = BatchAugmentation(AugmentConfig(enabled=True, flip_prob=0.0, prob=1.0, intensity=0.0), 2)
    _fixed_draws(augment, rotate_deg=0.0, zoom=1.25)

    # Execute
    out = augment(image)

    # Assert
    assert _centre_distance(out) == pytest.approx(8 * 1.25, rel=0.03)


def test_batch_augmentation_scales_and_shifts_intensity_within_its_range() -> None:
    # Prepare
    images = torch.ones(64, 1, 4, 4)
    cfg = AugmentConfig(enabled=True, flip_prob=0.0, prob=1.0, rotate_deg=0.0, scale=0.0, intensity=0.1)

    # Execute
    out = BatchAugmentation(cfg, 2)(images)

    # Assert: each image one value, 1 * (1 + u) + v with |u|, |v| <= 0.1
    per_image = out.flatten(1)
    assert torch.equal(per_image.min(1).values, per_image.max(1).values)
    assert per_image[:, 0].min() >= 0.8 - 1e-6 and per_image[:, 0].max() <= 1.2 + 1e-6
    assert per_image[:, 0].std() > 0.02
