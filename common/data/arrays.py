"""In-memory image datasets as plain numpy arrays: what every loader returns and every consumer reads.

Images are float32, channel-first (``(N, C, H, W)`` or ``(N, C, D, H, W)``) and scaled to ``[0, 1]``; labels are
int64 of shape ``(N,)``. Images are a numpy array, or, for a folder site with a cache, an
:class:`~medfed.common.data.image_files.ImageFiles` (the decoded images on the site's disk, read when indexed):
consumers index them a batch at a time (``images[indices]`` gives a numpy array either way).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from medfed.common.data.image_files import ImageFiles
from medfed.common.errors import SiteDataError

__all__ = ["ArrayDataset", "DatasetInfo", "DatasetSplits", "SiteData", "min_max_scale"]

logger = logging.getLogger(__name__)


def min_max_scale(values: np.ndarray) -> np.ndarray:
    """``values`` mapped linearly from their min..max to [0, 1] (all zeros when constant)."""
    low, high = float(np.min(values)), float(np.max(values))
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: classes, channels, dimensionality and image size.

    ``simulate_scanners`` marks datasets (the synthetic one) whose simulated hospitals get a per-site scanner
    style in :func:`common.data.federation.build_sites`; real datasets keep their own site differences.
    """

    name: str
    n_classes: int
    channels: int
    spatial_dims: int
    image_size: int
    class_names: tuple[str, ...]
    simulate_scanners: bool = False

    @property
    def task(self) -> str:
        """``"binary"`` for two classes, else ``"multiclass"``."""
        return "binary" if self.n_classes == 2 else "multiclass"


@dataclass(frozen=True)
class ArrayDataset:
    """Images (float32, channel-first, in ``[0, 1]``) and integer labels (int64, ``(N,)``) of one split.

    ``images`` is a numpy array or an :class:`~medfed.common.data.image_files.ImageFiles` (on disk, read when
    indexed; typed as an array because it answers the same indexing)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.labels.ndim != 1:
            raise SiteDataError(f"labels must have shape (N,); got shape {self.labels.shape}.")
        if self.images.ndim not in (4, 5):
            raise SiteDataError(
                f"images must be channel-first (N, C, H, W) or (N, C, D, H, W); got shape {self.images.shape}."
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise SiteDataError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels; every image needs one label."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at ``indices`` (positions into this dataset), as a new dataset (a copy; images on disk stay
        there, as a view of the same files)."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, ImageFiles):
            return ArrayDataset(images=cast(np.ndarray, self.images.subset(idx)), labels=self.labels[idx])
        return ArrayDataset(images=self.images[idx], labels=self.labels[idx])

    def class_counts(self, n_classes: int) -> np.ndarray:
        """How many samples of each class, int64 of shape ``(n_classes,)``."""
        if len(self) and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise SiteDataError(
                f"labels must lie in 0..{n_classes - 1}; found values {int(self.labels.min())}.."
                f"{int(self.labels.max())}. Check the label file or the dataset's class count."
            )
        return np.bincount(self.labels, minlength=n_classes).astype(np.int64)

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        """All samples of ``parts`` in order, as one dataset."""
        if not parts:
            raise ValueError("ArrayDataset.concat needs at least one part; got an empty sequence.")
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise SiteDataError(f"cannot concatenate datasets with different image shapes: {sorted(shapes)}.")
        files = [cast(ImageFiles, p.images) for p in parts if isinstance(p.images, ImageFiles)]
        if len(files) == len(parts) and len({f.folder for f in files}) == 1:  # one site cache: stays on disk
            images = cast(np.ndarray, ImageFiles.concat(files))
        else:
            images = np.concatenate([np.asarray(p.images) for p in parts], axis=0)
        return ArrayDataset(
            images=images,
            labels=np.concatenate([p.labels for p in parts], axis=0).astype(np.int64, copy=False),
        )


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's development pool (shared out to hospitals) and its global test set."""

    info: DatasetInfo
    train: ArrayDataset
    test: ArrayDataset


@dataclass(frozen=True)
class SiteData:
    """One hospital's local data: a training split, a local validation split, and the dataset's description."""

    site_id: str
    train: ArrayDataset
    val: ArrayDataset
    info: DatasetInfo
