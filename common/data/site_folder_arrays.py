"""A hospital's image folder as training arrays: labelled images decoded once (cached on the site's disk),
resized to the task's input, and split into training, validation and test data without patient leakage.

With a cache folder the images stay on disk, one file each, and are read a batch at a time
(:class:`~medfed.common.data.image_files.ImageFiles`): a site whose decoded images exceed memory trains.

What is in the folder and how one entry is read live in :mod:`medfed.common.data.site_folder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from medfed.common.atomic import atomic_write
from medfed.common.data.arrays import ArrayDataset
from medfed.common.data.image_files import ImageFiles, npy_layout
from medfed.common.data.partition import stratified_split
from medfed.common.data.site_folder import SPLITS, SiteEntry, read_resized, scan_site
from medfed.common.errors import SiteDataError

__all__ = ["DECODE_VERSION", "FolderData", "LabelledImages", "load_folder", "read_labelled"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderData:
    """A site folder as training data: labelled images resized to the task's input, split without patient
    leakage; ``skipped`` counts unreadable files, ``unlabelled`` readable images without a label."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset | None
    classes: list[str]
    skipped: int
    unlabelled: int


DECODE_VERSION = 1  # bump when decoding changes, so cached images are decoded again


def _cache_key(path: Path, size: int, dims: int, channels: int) -> str:
    """The cache file name of one entry, decoded at this size (the key covers the file's size and mtime)."""
    stamp = [path.resolve().as_posix(), size, dims, channels, DECODE_VERSION]
    for file in ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())):
        stat = file.stat()
        stamp += [file.name, stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]


def _cached(root: Path, entry: SiteEntry, folder: Path, size: int, dims: int, channels: int) -> str:
    """The cache key of the decoded, resized entry, decoding it into ``folder`` unless a whole file of the right
    shape is there already (decoded once per file version). Nothing stays in memory."""
    key = _cache_key(root / entry.path, size, dims, channels)
    target = folder / f"{key}.npy"
    if target.is_file():
        try:
            if npy_layout(target) == ((channels, *(size,) * dims), np.dtype(np.float32)):
                return key
        except (OSError, ValueError):
            pass
        logger.warning("ignoring a damaged cache entry")
    image = read_resized(root, entry, size, dims, channels).astype(np.float32, copy=False)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        np.save(handle, image, allow_pickle=False)
    return key


def _group_split(labels: np.ndarray, groups: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of the images, whole patients at a time, per class of each patient's first
    image (stratified by patient); returns sorted (keep, held) positions."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    names = sorted(by_group)
    group_labels = np.asarray([labels[by_group[g][0]] for g in names])
    keep_groups, held_groups = stratified_split(group_labels, fraction, seed=seed)
    keep = sorted(i for g in keep_groups for i in by_group[names[g]])
    held = sorted(i for g in held_groups for i in by_group[names[g]])
    return np.asarray(keep, dtype=np.int64), np.asarray(held, dtype=np.int64)


@dataclass(frozen=True)
class LabelledImages:
    """Every readable labelled image of a folder, with its manifest split and patient (or a per-image group)."""

    data: ArrayDataset
    splits: list[str | None]
    patients: list[str]
    classes: list[str]
    skipped: int
    unlabelled: int


def read_labelled(
    root: str | Path,
    labels: str | Path | None,
    classes: list[str] | None,
    *,
    image_size: int,
    spatial_dims: int,
    channels: int,
    cache_dir: str | Path | None = None,
) -> LabelledImages:
    """Decode (or read from the cache) every labelled image of a folder, resized; unreadable files are skipped
    and counted (their paths in the local log only).

    Raises:
        SiteDataError: no labelled image is readable.
    """
    root = Path(root)
    scan = scan_site(root, labels, classes)
    folder = Path(cache_dir) / "decoded" if cache_dir else None
    images: list[Any] = []  # decoded arrays without a cache folder, else their cache keys
    targets, splits, patients = [], [], []
    skipped = unlabelled = 0
    for index, entry in enumerate(scan.entries):
        if entry.label is None:
            unlabelled += 1
            continue
        try:
            images.append(read_resized(root, entry, image_size, spatial_dims, channels) if folder is None
                          else _cached(root, entry, folder, image_size, spatial_dims, channels))
        except SiteDataError as exc:
            skipped += 1
            logger.warning("skipping unreadable file %d (%s): %s", index, entry.path, exc)  # site-local log only
            continue
        targets.append(scan.classes.index(entry.label))
        splits.append(entry.split)
        patients.append(entry.patient_id or f"\0image-{index}")
    if not images:
        raise SiteDataError(
            f"no labelled image of the site is readable ({skipped} unreadable, {unlabelled} unlabelled); run "
            "`medfed hospital check --data DIR` for the reasons."
        )
    stacked = (np.stack(images).astype(np.float32) if folder is None  # (no cache folder: the images in memory)
               else cast(np.ndarray, ImageFiles(folder, np.asarray(images), (channels, *(image_size,) * spatial_dims),
                                                np.float32)))
    data = ArrayDataset(images=stacked, labels=np.asarray(targets, dtype=np.int64))
    return LabelledImages(data, splits, patients, scan.classes, skipped, unlabelled)


def load_folder(
    root: str | Path,
    labels: str | Path | None,
    classes: list[str] | None,
    *,
    image_size: int,
    spatial_dims: int,
    channels: int,
    val_fraction: float,
    seed: int,
    cache_dir: str | Path | None = None,
) -> FolderData:
    """Read a site folder into training arrays (see :func:`read_labelled`).

    Splits: the manifest's ``split`` column where given; the rest is split into train/val with ``val_fraction``
    held out, whole patients at a time when ``patient_id`` is given (a patient never straddles train/val/test: a
    patient with any image marked ``test`` or ``val`` has all its unmarked images there too).

    Raises:
        SiteDataError: no labelled image is readable, or too few for a training and a validation split.
    """
    found = read_labelled(root, labels, classes, image_size=image_size, spatial_dims=spatial_dims,
                          channels=channels, cache_dir=cache_dir)
    data, splits, patients = found.data, found.splits, found.patients
    # a patient goes wholly where any of its images is marked (test before val before train)
    fixed: dict[str, str] = {}
    for patient, split in zip(patients, splits, strict=True):
        if split is not None and SPLITS.index(split) > SPLITS.index(fixed.get(patient, "train")):
            fixed[patient] = split
    assigned = [fixed.get(p) or s for p, s in zip(patients, splits, strict=True)]
    free = [i for i, s in enumerate(assigned) if s is None]
    keep, held = _group_split(data.labels[free], [patients[i] for i in free], val_fraction, seed)
    for position in held:
        assigned[free[position]] = "val"
    for position in keep:
        assigned[free[position]] = "train"
    index_of = {s: np.asarray([i for i, a in enumerate(assigned) if a == s], dtype=np.int64) for s in SPLITS}
    if len(index_of["train"]) == 0 or len(index_of["val"]) == 0:
        raise SiteDataError(
            f"the site has {len(data)} readable labelled images, too few for a training and a validation split "
            "(a site needs at least 2 images of one class, or val rows in its manifest)."
        )
    return FolderData(
        train=data.subset(index_of["train"]),
        val=data.subset(index_of["val"]),
        test=data.subset(index_of["test"]) if len(index_of["test"]) else None,
        classes=found.classes,
        skipped=found.skipped,
        unlabelled=found.unlabelled,
    )
