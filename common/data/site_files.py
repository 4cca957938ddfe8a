"""A hospital's own labelled images as one array file: ``images`` (and ``labels``) in an ``.npz``.

This is the deployment data format every medfed version reads (image folders, DICOM and NIfTI series are decoded
into the same arrays). Images may be ``(N, H, W)``, ``(N, H, W, C)`` with C in {1, 3}, ``(N, C, H, W)`` or
``(N, C, D, H, W)``; uint8 images are scaled to ``[0, 1]``. Labels come from the file's ``labels`` array, or from a
separate CSV (``index,label`` rows, the index counting images from 0; a header line is allowed).

Errors name the file by its name only and the problem by counts and positions, never by pixel values or paths.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from pathlib import Path

import numpy as np

from medfed.common.atomic import atomic_write
from medfed.common.data.arrays import ArrayDataset
from medfed.common.errors import SiteDataError

__all__ = ["load_array_file", "write_array_file"]

logger = logging.getLogger(__name__)


def _channel_first(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) grey
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C)
        return np.moveaxis(images, -1, 1)
    if images.ndim in (4, 5):
        return images
    raise SiteDataError(
        f"{name}: 'images' has shape {images.shape}; expected (N, H, W), (N, H, W, C), (N, C, H, W) or "
        "(N, C, D, H, W). Re-export the images in one of these layouts."
    )


def _scaled(images: np.ndarray, name: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating) and not np.issubdtype(images.dtype, np.integer):
        raise SiteDataError(f"{name}: 'images' has dtype {images.dtype}; expected uint8 or float pixels.")
    out = images.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        raise SiteDataError(
            f"{name}: {int((~finite).sum())} pixel values are NaN or infinite; fix or drop those images."
        )
    low, high = float(out.min(initial=0.0)), float(out.max(initial=0.0))
    if low < 0.0 or high > 1.0:  # rescale to [0, 1] as a whole (keeps relative intensities between images)
        out = (out - low) / max(high - low, 1e-12)
    return out


def _labels_from_csv(path: Path, n_images: int) -> np.ndarray:
    labels = np.full(n_images, -1, dtype=np.int64)
    with path.open(newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_no == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 2:
                raise SiteDataError(f"{path.name} line {line_no}: expected 'index,label', got {len(row)} column(s).")
            try:
                index, label = int(row[0]), int(row[1])
            except ValueError:
                raise SiteDataError(
                    f"{path.name} line {line_no}: index and label must be integers (labels are class numbers "
                    "0..n_classes-1)."
                ) from None
            if not 0 <= index < n_images:
                raise SiteDataError(
                    f"{path.name} line {line_no}: image index {index} is out of range; the array file holds "
                    f"{n_images} images (0..{n_images - 1})."
                )
            labels[index] = label
    missing = int((labels < 0).sum())
    if missing:
        raise SiteDataError(
            f"{path.name}: {missing} of {n_images} images have no label (first unlabelled index "
            f"{int(np.flatnonzero(labels < 0)[0])}); give every image one 'index,label' row."
        )
    return labels


def load_array_file(path: Path, *, n_classes: int, labels_csv: Path | None = None) -> ArrayDataset:
    """Read a hospital's array file (and optional label CSV) into an :class:`ArrayDataset`, checking labels."""
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"The site's data file {path.name} does not exist; check data_path in the site config.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise SiteDataError(
                    f"{path.name} has no 'images' array (it holds {sorted(npz.files)}); save the images as "
                    "np.savez(file, images=..., labels=...)."
                )
            images = npz["images"]
            raw_labels = npz["labels"] if "labels" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SiteDataError(f"{path.name} is not a readable .npz file ({type(exc).__name__}).") from None
    images = _scaled(_channel_first(images, path.name), path.name)
    if labels_csv is not None:
        labels = _labels_from_csv(Path(labels_csv), len(images))
    elif raw_labels is not None:
        labels = np.asarray(raw_labels).reshape(len(raw_labels), -1)
        if labels.shape[1] != 1:
            raise SiteDataError(
                f"{path.name}: 'labels' has {labels.shape[1]} columns; medfed trains single-label classifiers "
                "(one class number per image)."
            )
        labels = labels[:, 0]
        if not np.issubdtype(labels.dtype, np.integer):
            raise SiteDataError(f"{path.name}: 'labels' has dtype {labels.dtype}; expected class numbers (integers).")
        labels = labels.astype(np.int64)
    else:
        raise SiteDataError(f"{path.name} has no 'labels' array and no label CSV is configured (data.labels).")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise SiteDataError(
            f"{path.name}: {bad.size} labels are outside 0..{n_classes - 1} (first at image index {int(bad[0])}); "
            f"the site config declares n_classes={n_classes}. Fix the labels or data.n_classes."
        )
    return ArrayDataset(images=images, labels=labels)


def write_array_file(path: Path, data: ArrayDataset) -> None:
    """Write ``data`` as an array file :func:`load_array_file` reads (atomically)."""
    with atomic_write(Path(path)) as handle:
        np.savez(handle, images=data.images, labels=data.labels)
