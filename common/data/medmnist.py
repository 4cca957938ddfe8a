"""Loader of official MedMNIST v2/v3 npz files (2D grey, 2D colour and 3D; binary or multi-class).

The file ``DATA_PATH/NAME.npz`` (28 px) or ``DATA_PATH/NAME_SIZE.npz`` holds the keys ``train_images``, ``train_labels``,
``val_images``, ``val_labels``, ``test_images`` and ``test_labels`` (uint8). The official train and val splits
together become the development pool that simulated hospitals share out; the official test split is the global
test set. The optional ``medmnist`` package (``pip install "medfed[download]"``) is used only to download a
missing file and, when importable, for the class names.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from medfed.common.config import MedMNISTConfig
from medfed.common.data.arrays import ArrayDataset, DatasetInfo, DatasetSplits
from medfed.common.errors import ConfigError, DatasetUnavailableError

__all__ = ["load_medmnist", "medmnist_path"]

logger = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/10519652"
SPLIT_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")

# Label names of the MedMNIST datasets this project ships examples for (from medmnist.INFO); others use "0", "1", ...
KNOWN_CLASS_NAMES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "breastmnist": ("malignant", "normal, benign"),
        "pneumoniamnist": ("normal", "pneumonia"),
        "adrenalmnist3d": ("normal", "hyperplasia"),
    }
)


def medmnist_path(cfg: MedMNISTConfig) -> Path:
    """Where the npz of ``cfg`` lives: ``DATA_PATH/NAME.npz`` for 28 px, else ``DATA_PATH/NAME_SIZE.npz`` (``~`` expanded)."""
    root = Path(cfg.data_path).expanduser()
    return root / (f"{cfg.name}.npz" if cfg.size == 28 else f"{cfg.name}_{cfg.size}.npz")


def _medmnist_info(name: str) -> dict[str, Any] | None:
    """``medmnist.INFO[name]`` when the optional package is importable, else ``None``."""
    try:
        import medmnist
    except ImportError:
        return None
    info = getattr(medmnist, "INFO", {}).get(name)
    return dict(info) if isinstance(info, dict) else None


def _download(cfg: MedMNISTConfig, path: Path) -> None:
    """Download the npz with the optional ``medmnist`` package, or raise a DatasetUnavailableError saying how else."""
    place = f"place {path.name} in the directory given by dataset.data_path (from the Zenodo record {ZENODO_RECORD})"
    try:
        import medmnist
    except ImportError:
        raise DatasetUnavailableError(
            f"{path.name} is missing and dataset.download=true needs the medmnist package: "
            f'`pip install "medfed[download]"`, or {place}.'
        ) from None
    info = getattr(medmnist, "INFO", {}).get(cfg.name)
    if info is None:
        raise ConfigError(
            f"dataset.name={cfg.name!r} is not a MedMNIST flag known to the medmnist package; use e.g. "
            "pneumoniamnist, breastmnist, organamnist or adrenalmnist3d."
        )
    data_class = getattr(medmnist, info["python_class"])
    kwargs: dict[str, Any] = {"split": "train", "download": True, "root": str(path.parent)}
    if cfg.size != 28:
        kwargs["size"] = cfg.size
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading MedMNIST %s (size %d) to %s", cfg.name, cfg.size, path.parent)
    try:
        data_class(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any downloader failure means: not available, say what to do
        logger.debug("MedMNIST download failed", exc_info=True)
        raise DatasetUnavailableError(
            f"Downloading {path.name} failed ({type(exc).__name__}; offline?). Download it elsewhere and {place}."
        ) from None
    if not path.is_file():
        raise DatasetUnavailableError(f"The medmnist package did not produce {path.name}; {place}.")


def _channel_first(images: np.ndarray, name: str, split: str) -> np.ndarray:
    """uint8 MedMNIST images -> float32 channel-first in [0, 1]."""
    if images.ndim == 3:  # (N, H, W) grey 2D
        out = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3 and not name.endswith("3d"):
        out = np.transpose(images, (0, 3, 1, 2))  # (N, H, W, 3) colour 2D
    elif images.ndim == 4:  # (N, D, H, W) grey 3D
        out = images[:, None]
    else:
        raise DatasetUnavailableError(
            f"{name}: {split}_images has shape {images.shape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W). "
            "Is this an official MedMNIST file?"
        )
    result = np.empty(out.shape, dtype=np.float32)
    np.multiply(out, np.float32(1.0 / 255.0), out=result, casting="unsafe")
    return result


def _labels(labels: np.ndarray, name: str, split: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise ConfigError(
            f"dataset.name={name!r} is a multi-label MedMNIST dataset ({labels.shape[1]} label columns); "
            "multi-label MedMNIST datasets are not supported yet. Choose a binary or multi-class one, e.g. "
            "pneumoniamnist, breastmnist or organamnist."
        )
    if labels.ndim not in (1, 2):
        raise DatasetUnavailableError(f"{name}: {split}_labels has shape {labels.shape}; expected (N, 1).")
    flat = labels.reshape(-1).astype(np.int64)
    if flat.size and flat.min() < 0:
        raise DatasetUnavailableError(f"{name}: {split}_labels holds negative labels; expected 0..K-1.")
    return flat


def _read_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in SPLIT_KEYS if k not in npz.files]
            if missing:
                raise DatasetUnavailableError(
                    f"{path.name} lacks the keys {', '.join(missing)}; an official MedMNIST npz holds "
                    f"{', '.join(SPLIT_KEYS)}. Replace it with the file from {ZENODO_RECORD}."
                )
            return {k: npz[k] for k in SPLIT_KEYS}
    except DatasetUnavailableError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        logger.debug("Reading %s failed", path, exc_info=True)
        raise DatasetUnavailableError(
            f"{path.name} for dataset.name={name!r} is corrupt or truncated ({type(exc).__name__}); delete it and "
            f"place a fresh copy from {ZENODO_RECORD} (or set dataset.download=true when online)."
        ) from None


def load_medmnist(cfg: MedMNISTConfig) -> DatasetSplits:
    """Read an official MedMNIST npz: train + val become the development pool, test the global test set.

    Raises:
        DatasetUnavailableError: the file is missing (and cannot be downloaded), corrupt, or lacks keys.
        ConfigError: the dataset is multi-label.
    """
    path = medmnist_path(cfg)
    if not path.is_file():
        if not cfg.download:
            raise DatasetUnavailableError(
                f"MedMNIST file {path.name} not found: the folder given by dataset.data_path must contain {path.name} "
                f"(from {ZENODO_RECORD}). Set dataset.data_path=DIR to the folder that holds it, or set "
                "dataset.download=true when online."
            )
        _download(cfg, path)
    raw = _read_npz(path, cfg.name)
    labels = {s: _labels(raw[f"{s}_labels"], cfg.name, s) for s in ("train", "val", "test")}
    images = {s: _channel_first(raw[f"{s}_images"], cfg.name, s) for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        if images[split].shape[0] != labels[split].shape[0]:
            raise DatasetUnavailableError(
                f"{path.name}: {split}_images has {images[split].shape[0]} images but {split}_labels has "
                f"{labels[split].shape[0]} labels; the file is inconsistent."
            )
    shapes = {images[s].shape[1:] for s in images}
    if len(shapes) != 1:
        raise DatasetUnavailableError(f"{path.name}: the splits have different image shapes {sorted(shapes)}.")
    sample_shape = images["train"].shape[1:]

    info_dict = _medmnist_info(cfg.name)
    if info_dict is not None and isinstance(info_dict.get("label"), dict):
        label_map = info_dict["label"]
        class_names = tuple(str(label_map[k]) for k in sorted(label_map, key=int))
    else:
        observed = max((int(v.max()) for v in labels.values() if v.size), default=-1) + 1
        known = KNOWN_CLASS_NAMES.get(cfg.name)
        n = max(observed, len(known) if known else 0, 2)
        class_names = known if known and len(known) == n else tuple(str(i) for i in range(n))
    n_classes = len(class_names)
    top = max((int(v.max()) for v in labels.values() if v.size), default=0)
    if top >= n_classes:
        raise DatasetUnavailableError(f"{path.name}: label {top} is out of range for {n_classes} classes.")

    info = DatasetInfo(
        name=cfg.name,
        n_classes=n_classes,
        channels=int(sample_shape[0]),
        spatial_dims=len(sample_shape) - 1,
        image_size=int(sample_shape[-1]),
        class_names=class_names,
    )
    train = ArrayDataset(
        images=np.concatenate([images["train"], images["val"]], axis=0),
        labels=np.concatenate([labels["train"], labels["val"]], axis=0),
    )
    logger.info(
        "Loaded MedMNIST %s: %d development images, %d test images, %d classes, shape %s",
        cfg.name, len(train), len(labels["test"]), n_classes, sample_shape,
    )
    return DatasetSplits(info=info, train=train, test=ArrayDataset(images=images["test"], labels=labels["test"]))
