"""Tests of common.data.transforms: MONAI augmentation in 2D and 3D, torch views of ArrayDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.common.config import AugmentConfig
from medfed.common.data.arrays import ArrayDataset
from medfed.common.data.transforms import AugmentedDataset, build_augmentation, to_tensor_dataset


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


def test_augmented_dataset_yields_tensors_and_leaves_the_arrays_alone() -> None:
    # Prepare
    data = _data((1, 28, 28))
    before = data.images.copy()
    dataset = AugmentedDataset(data, build_augmentation(AugmentConfig(enabled=True, prob=1.0), 2))

    # Execute
    image, label = dataset[1]

    # Assert
    assert len(dataset) == 4
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1
    assert np.array_equal(data.images, before)


def test_plain_dataset_returns_the_stored_image() -> None:
    # Prepare
    data = _data((1, 8, 8))

    # Execute
    image, _ = AugmentedDataset(data)[2]

    # Assert
    assert np.array_equal(image.numpy(), data.images[2])


def test_tensor_dataset_shares_memory() -> None:
    # Prepare
    data = _data((1, 8, 8))

    # Execute
    tensors = to_tensor_dataset(data)

    # Assert
    images, labels = tensors.tensors
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert np.shares_memory(images.numpy(), data.images)


def test_augmentation_pickles_for_dataloader_workers() -> None:
    # Prepare
    import pickle

    augment = build_augmentation(AugmentConfig(enabled=True, prob=1.0), 3, seed=0)
    image = torch.rand(1, 8, 8, 8)

    # Execute
    clone = pickle.loads(pickle.dumps(augment))

    # Assert
    assert clone(image).shape == (1, 8, 8, 8)
