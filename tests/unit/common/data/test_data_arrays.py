"""Tests of common.data.arrays: the ArrayDataset container and DatasetInfo."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.data.arrays import ArrayDataset, DatasetInfo
from medfed.common.errors import SiteDataError


def _data(n: int, offset: int = 0) -> ArrayDataset:
    images = np.arange(offset, offset + n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    return ArrayDataset(images=images, labels=np.arange(n, dtype=np.int64) % 3)


@pytest.mark.parametrize(("n_classes", "task"), [(2, "binary"), (3, "multiclass"), (11, "multiclass")])
def test_task_follows_the_class_count(n_classes: int, task: str) -> None:
    # Execute / Assert
    assert DatasetInfo("x", n_classes, 1, 2, 28, tuple(map(str, range(n_classes)))).task == task


def test_subset_concat_and_counts() -> None:
    # Prepare
    a, b = _data(4), _data(3, offset=10)

    # Execute
    joined = ArrayDataset.concat([a, b])
    picked = joined.subset(np.array([0, 5]))

    # Assert
    assert len(joined) == 7
    assert joined.class_counts(3).tolist() == [3, 2, 2]
    assert picked.images[:, 0, 0, 0].tolist() == [0.0, 11.0]
    assert picked.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((3, 1, 4, 4), np.float32), np.zeros(2, np.int64), "3 images but 2 labels"),
        (np.zeros((3, 4, 4), np.float32), np.zeros(3, np.int64), "channel-first"),
        (np.zeros((3, 1, 4, 4), np.float32), np.zeros((3, 1), np.int64), r"shape \(N,\)"),
    ],
)
def test_bad_arrays_are_rejected(images: np.ndarray, labels: np.ndarray, match: str) -> None:
    # Execute / Assert
    with pytest.raises(SiteDataError, match=match):
        ArrayDataset(images=images, labels=labels)


def test_class_counts_reject_labels_out_of_range() -> None:
    # Execute / Assert
    with pytest.raises(SiteDataError, match="0..1"):
        _data(4).class_counts(2)
