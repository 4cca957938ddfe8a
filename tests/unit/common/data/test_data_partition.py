"""Tests of common.data.partition: iid / Dirichlet / quantity partitioners and stratified hold-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.data.partition import partition_indices, stratified_split
from medfed.common.errors import ConfigError


def _labels(n: int = 600, n_classes: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, n)


def _max_class_share(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=n_classes).max() / len(p) for p in parts]))


@pytest.mark.parametrize(
    ("scheme", "n_parts", "alpha", "min_size"),
    [("iid", 1, 0.5, 1), ("iid", 4, 0.5, 10), ("dirichlet", 3, 0.5, 10), ("dirichlet", 5, 0.1, 5),
     ("quantity", 4, 0.5, 10), ("quantity", 6, 0.2, 30)],
)
def test_partition_is_disjoint_covering_sorted_and_honours_min_size(
    scheme: str, n_parts: int, alpha: float, min_size: int
) -> None:
    # Prepare
    labels = _labels()

    # Execute
    parts = partition_indices(labels, n_parts, scheme, alpha=alpha, seed=1, min_size=min_size)

    # Assert
    assert len(parts) == n_parts
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # disjoint and covering
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert len(part) >= min_size


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partition_is_deterministic_by_seed(scheme: str) -> None:
    # Prepare
    labels = _labels()
    kwargs = {"alpha": 0.5, "min_size": 10}

    # Execute
    first = partition_indices(labels, 4, scheme, seed=7, **kwargs)
    again = partition_indices(labels, 4, scheme, seed=7, **kwargs)
    other = partition_indices(labels, 4, scheme, seed=8, **kwargs)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_are_even() -> None:
    # Execute
    parts = partition_indices(_labels(601), 4, "iid", alpha=0.5, seed=0, min_size=1)

    # Assert
    assert sorted(len(p) for p in parts) == [150, 150, 150, 151]


def test_dirichlet_small_alpha_skews_labels_far_more_than_iid() -> None:
    # Prepare
    labels = _labels(2000, n_classes=4)

    # Execute
    iid = partition_indices(labels, 5, "iid", alpha=0.1, seed=0, min_size=10)
    skewed = partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0, min_size=10)

    # Assert
    assert _max_class_share(labels, iid, 4) < 0.32
    assert _max_class_share(labels, skewed, 4) > 0.6


def test_quantity_skew_gives_unequal_sizes_with_iid_labels() -> None:
    # Prepare
    labels = _labels(3000, n_classes=2)

    # Execute
    parts = partition_indices(labels, 4, "quantity", alpha=0.5, seed=3, min_size=50)

    # Assert
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()
    shares = [labels[p].mean() for p in parts if len(p) >= 200]
    assert max(abs(s - labels.mean()) for s in shares) < 0.08


@pytest.mark.parametrize(
    ("n", "n_parts", "scheme", "alpha", "min_size", "match"),
    [
        (100, 3, "random", 0.5, 1, "iid, dirichlet, quantity"),
        (100, 11, "iid", 0.5, 10, "federation.hospitals=11"),
        (100, 0, "iid", 0.5, 1, "federation.hospitals=0"),
        (100, 3, "dirichlet", 0.0, 1, "federation.alpha=0.0"),
        (60, 5, "dirichlet", 0.01, 12, "larger federation.alpha"),
    ],
)
def test_partition_rejects_bad_input(n: int, n_parts: int, scheme: str, alpha: float, min_size: int, match: str) -> None:
    # Prepare
    labels = _labels(n, n_classes=2)

    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        partition_indices(labels, n_parts, scheme, alpha=alpha, seed=0, min_size=min_size)


def test_stratified_split_holds_out_each_class_proportionally() -> None:
    # Prepare
    labels = np.array([0] * 80 + [1] * 20)

    # Execute
    keep, held = stratified_split(labels, 0.25, seed=0)

    # Assert
    assert np.bincount(labels[held], minlength=2).tolist() == [20, 5]
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)
    assert keep.dtype == held.dtype == np.int64


@pytest.mark.parametrize(
    ("labels", "fraction", "n_held"),
    [([0, 0, 1, 1], 0.1, 2), ([0, 1, 2], 0.5, 0), ([0, 0], 0.9, 1), ([0, 0, 0, 1], 0.2, 1)],
)
def test_stratified_split_tiny_partitions_keep_a_training_set(labels: list[int], fraction: float, n_held: int) -> None:
    # Execute
    keep, held = stratified_split(np.array(labels), fraction, seed=0)

    # Assert
    assert len(held) == n_held
    assert len(keep) == len(labels) - n_held > 0


def test_stratified_split_is_deterministic() -> None:
    # Prepare
    labels = _labels(300)

    # Execute
    a = stratified_split(labels, 0.2, seed=5)
    b = stratified_split(labels, 0.2, seed=5)
    c = stratified_split(labels, 0.2, seed=6)

    # Assert
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
