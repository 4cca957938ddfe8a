"""Schemas of the ``dataset`` group: one per source (``dataset=synthetic|medmnist|folder``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from medfed.common.config.checks import require_choice, require_positive
from medfed.common.errors import ConfigError

__all__ = [
    "DatasetConfig",
    "FolderConfig",
    "MedMNISTConfig",
    "SyntheticConfig",
]

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """Base of every dataset option; ``source`` picks the loader (set by the group's YAML)."""

    source: str = "synthetic"
    # label scarcity (task=classify): each hospital keeps the labels of this stratified fraction of its training
    # images (at least one per class); task=ssl uses every image, labelled or not
    label_fraction: float = 1.0
    name: str = "synthetic"


@dataclass
class MedMNISTConfig(DatasetConfig):
    """An official MedMNIST v2/v3 npz file, ``DATA_PATH/NAME.npz`` (28 px) or ``DATA_PATH/NAME_SIZE.npz``."""

    source: str = "medmnist"
    name: str = "pneumoniamnist"
    data_path: str = "~/.medmnist"  # the folder holding the npz files
    size: int = 28
    download: bool = False

    def __post_init__(self) -> None:
        require_choice("dataset.size", self.size, (28, 64, 128, 224))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(
                f"dataset.name={self.name!r} is not a MedMNIST flag; use e.g. pneumoniamnist, breastmnist, "
                "organamnist or adrenalmnist3d."
            )


@dataclass
class SyntheticConfig(DatasetConfig):
    """An offline synthetic imaging task whose hospitals differ like scanners (intensity, contrast, noise)."""

    source: str = "synthetic"
    name: str = "synthetic"
    n_train: int = 1200
    n_test: int = 400
    n_classes: int = 2
    channels: int = 1
    spatial_dims: int = 2
    image_size: int = 28
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive("dataset.n_train", self.n_train)
        require_positive("dataset.n_test", self.n_test)
        if self.n_classes < 2:
            raise ConfigError(f"dataset.n_classes={self.n_classes!r} is out of range; it must be >= 2.")
        require_choice("dataset.channels", self.channels, (1, 3))
        require_choice("dataset.spatial_dims", self.spatial_dims, (2, 3))
        if self.image_size < 8:
            raise ConfigError(f"dataset.image_size={self.image_size!r} is out of range; it must be >= 8.")


@dataclass
class FolderConfig(DatasetConfig):
    """Each simulated hospital's own image folder (DICOM files/series, NIfTI, PNG/JPEG), as a deployed hospital
    would have it; labels from a manifest per hospital or class subfolders (see ``medfed hospital check``)."""

    source: str = "folder"
    name: str = "folder"
    data_paths: list[str] = field(default_factory=list)  # one folder per simulated hospital
    labels: list[str] = field(default_factory=list)  # a manifest per hospital ('' or none: class subfolders)
    test_data_path: str = ""  # the global test set's folder ('': the hospitals' images marked split=test)
    test_labels: str = ""
    classes: list[str] = field(default_factory=list)  # label names in class-index order
    image_size: int = 28  # every image is resized to this (per spatial axis)
    channels: int = 1  # 1 grey (colour converted to luminance) or 3
    spatial_dims: int = 2  # 2 images (a volume's middle slice) or 3 volumes

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(
                f"dataset.classes={list(self.classes)!r} must name at least 2 labels, in class-index order, e.g. "
                "dataset.classes=[benign,malignant]."
            )
        if not self.data_paths:
            raise ConfigError("dataset.data_paths is empty; give one image folder per hospital, e.g. "
                              "dataset.data_paths=[a,b].")
        if self.labels and len(self.labels) != len(self.data_paths):
            raise ConfigError(
                f"dataset.labels has {len(self.labels)} entries for {len(self.data_paths)} dataset.data_paths; give one manifest "
                "per hospital ('' for class subfolders) or none."
            )
        require_choice("dataset.channels", self.channels, (1, 3))
        require_choice("dataset.spatial_dims", self.spatial_dims, (2, 3))
        if self.image_size < 8:
            raise ConfigError(f"dataset.image_size={self.image_size!r} is out of range; it must be >= 8.")
