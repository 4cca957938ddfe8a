"""A hospital's image folder: what is in it (:func:`scan_site`), how one entry is read (:func:`read_entry`), and the
site data check (:func:`check_site`) behind ``medfed hospital check``.

A site folder holds DICOM files (``.dcm``, or no suffix), DICOM series (a folder of slices), NIfTI volumes
(``.nii``/``.nii.gz``) or PNG/JPEG images. Labels come from a manifest CSV with the header
``path,label[,split][,patient_id]`` (paths relative to the folder; an empty label marks an unlabelled image) or,
without one, from the first-level subfolder each image is in (one subfolder per class). Images with no label stay
usable for self-supervised learning.

Nothing here leaves the site: reports name files by their index in the scan; paths go to the local log only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.atomic import atomic_write
from medfed.common.data.arrays import ArrayDataset, min_max_scale
from medfed.common.data.dicom import read_dicom, read_series
from medfed.common.data.partition import stratified_split
from medfed.common.errors import SiteDataError

__all__ = ["CheckReport", "FolderData", "SiteEntry", "SiteScan", "check_site", "image_entries", "load_folder", "read_entry",
           "read_labelled", "read_resized", "scan_site"]

logger = logging.getLogger(__name__)

_IMAGE = (".png", ".jpg", ".jpeg")
_NIFTI = (".nii", ".nii.gz")
_SKIPPED = (".csv", ".txt", ".json", ".yaml", ".yml", ".md")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SiteEntry:
    """One image (or DICOM series) of the site; ``path`` is relative to the site folder."""

    path: str
    kind: str  # dicom | series | nifti | image
    label: str | None = None
    split: str | None = None
    patient_id: str | None = None


@dataclass
class SiteScan:
    """What a site folder holds, and what is wrong with its labels."""

    entries: list[SiteEntry]
    classes: list[str]
    unknown_labels: Counter[str] = field(default_factory=Counter)  # label -> rows (labels outside ``classes``)
    missing_files: int = 0  # manifest rows whose file does not exist
    bad_rows: int = 0  # manifest rows with an empty path or an unknown split
    unlisted: int = 0  # images in the folder that the manifest does not name (kept, unlabelled)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "series"
    if name.startswith(".") or name.endswith(_SKIPPED):
        return None
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(_IMAGE):
        return "image"
    if name.endswith(".dcm") or "." not in name:
        return "dicom"
    return None


def _is_series(folder: Path) -> bool:
    """A folder whose entries are all DICOM files (no subfolders): one series."""
    children = [c for c in folder.iterdir() if not c.name.startswith(".")]
    return bool(children) and all(c.is_file() and _kind(c) == "dicom" for c in children)


def _walk(root: Path, *, class_level: bool) -> list[Path]:
    """Every image under ``root``: files, and series folders. With ``class_level`` the first-level folders are
    classes (never series)."""
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                if not (class_level and depth == 0) and _is_series(child):
                    found.append(child)
                else:
                    visit(child, depth + 1)
            elif _kind(child) is not None:
                found.append(child)

    visit(root, 0)
    return found


def scan_site(root: str | Path, labels: str | Path | None = None, classes: list[str] | None = None) -> SiteScan:
    """List the site's images and their labels (from ``labels``, a manifest CSV, or the class subfolders).

    ``classes`` fixes the label set (e.g. from the federation's task); labels outside it are counted as unknown and
    their images kept unlabelled. Without it the labels found are the classes, sorted.

    Raises:
        SiteDataError: the folder does not exist, or the manifest has no ``path`` and ``label`` columns.
    """
    root = Path(root)
    if not root.is_dir():
        raise SiteDataError("the site data folder does not exist or is not a folder; check --data / data.root.")
    if labels is not None:
        return _scan_manifest(root, Path(labels), classes)
    entries = []
    for path in _walk(root, class_level=True):
        rel = path.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        entries.append(SiteEntry(path=rel.as_posix(), kind=_kind(path) or "dicom", label=label))
    found = sorted({e.label for e in entries if e.label is not None})
    return _with_classes(SiteScan(entries=entries, classes=found), classes)


def _with_classes(scan: SiteScan, classes: list[str] | None) -> SiteScan:
    if classes is None:
        return scan
    kept = []
    for entry in scan.entries:
        if entry.label is not None and entry.label not in classes:
            scan.unknown_labels[entry.label] += 1
            entry = SiteEntry(entry.path, entry.kind, None, entry.split, entry.patient_id)
        kept.append(entry)
    scan.entries, scan.classes = kept, list(classes)
    return scan


def _scan_manifest(root: Path, manifest: Path, classes: list[str] | None) -> SiteScan:
    if not manifest.is_file():
        raise SiteDataError("the label manifest does not exist; check --labels / data.labels.")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
        columns = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    if rows and not {"path", "label"} <= set(columns):
        raise SiteDataError(
            f"the label manifest has columns {columns}; it needs a header 'path,label' (optionally ',split' and "
            "',patient_id'), one row per image, paths relative to the data folder."
        )
    scan = SiteScan(entries=[], classes=[])
    named: set[str] = set()
    for row in rows:
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        rel, split = row.get("path", ""), row.get("split", "").lower() or None
        if not rel or (split is not None and split not in SPLITS):
            scan.bad_rows += 1
            continue
        path = root / rel
        if not path.exists() or root.resolve() not in path.resolve().parents:
            scan.missing_files += 1
            logger.warning("manifest row for a missing file: %s", rel)  # site-local log only
            continue
        named.add(path.resolve().as_posix())
        kind = _kind(path) or "dicom"
        scan.entries.append(SiteEntry(rel, kind, row.get("label") or None, split, row.get("patient_id") or None))
    series = {Path(p) for p in named if Path(p).is_dir()}
    for path in _walk(root, class_level=True):
        files = sorted(path.iterdir()) if path.is_dir() and path.resolve() not in series else [path]
        for file in files:
            resolved = file.resolve()
            if resolved.as_posix() in named or resolved == manifest.resolve() or any(s in resolved.parents for s in series):
                continue
            scan.unlisted += 1  # an image the manifest does not name: kept, unlabelled
            scan.entries.append(SiteEntry(file.relative_to(root).as_posix(), _kind(file) or "dicom"))
    scan.classes = sorted({e.label for e in scan.entries if e.label is not None})
    return _with_classes(scan, classes)


def read_entry(root: str | Path, entry: SiteEntry) -> np.ndarray:
    """One entry decoded to float32 ``(C, H, W)`` (2D) or ``(C, D, H, W)`` (volumes) in ``[0, 1]``.

    A multi-frame DICOM file is a volume (its frames are the depth). Raises :class:`SiteDataError` (including
    :class:`~common.data.dicom.DicomReadError`) with a reason that names no path.
    """
    path = Path(root) / entry.path
    if entry.kind == "series":
        return read_series(sorted(p for p in path.iterdir() if p.is_file()))
    if entry.kind == "dicom":
        frames = read_dicom(path)
        return frames[0] if frames.shape[0] == 1 else np.moveaxis(frames, 0, 1)
    if entry.kind == "image":
        return _read_image(path)
    return _read_nifti(path)


def image_entries(path: str | Path) -> tuple[Path, list[SiteEntry]]:
    """The images at ``path``, unlabelled: one file, or every image under a folder laid out like a site folder
    (the folder and its first-level subfolders group images; a DICOM series is a folder below those). Returns the
    root the entries are relative to.

    Raises:
        SiteDataError: nothing there, or no image in it.
    """
    path = Path(path)
    if not path.exists():
        raise SiteDataError("the image path does not exist; check the --images argument.")
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise SiteDataError("the file is not an image medfed reads (DICOM, NIfTI, PNG/JPEG).")
        return path.parent, [SiteEntry(path.name, kind)]
    entries = [SiteEntry(p.relative_to(path).as_posix(), _kind(p) or "dicom") for p in _walk(path, class_level=True)]
    if not entries:
        raise SiteDataError("the folder holds no image medfed reads (DICOM files or series, NIfTI, PNG/JPEG).")
    return path, entries


def read_resized(root: str | Path, entry: SiteEntry, size: int, spatial_dims: int, channels: int) -> np.ndarray:
    """:func:`read_entry`, converted to ``channels`` and resized to the task's input (as training saw it)."""
    return _resize(read_entry(root, entry), size, spatial_dims, channels)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = "RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L"
            array = np.asarray(image.convert(mode) if image.mode not in ("I;16", "I", "F") else image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SiteDataError(f"unreadable image file ({type(exc).__name__}: not a PNG/JPEG or truncated)") from None
    values = array.astype(np.float64)
    if array.dtype == np.uint8:
        values /= 255.0
    else:  # 16-bit or float greyscale
        values = min_max_scale(values)
    values = values[None] if values.ndim == 2 else np.moveaxis(values, -1, 0)
    return np.ascontiguousarray(values, dtype=np.float32)


def _read_nifti(path: Path) -> np.ndarray:
    from monai.transforms import LoadImage

    try:
        volume = np.asarray(LoadImage(image_only=True, ensure_channel_first=True)(str(path)), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - MONAI wraps reader errors in several types
        raise SiteDataError(f"unreadable NIfTI file ({type(exc).__name__}: not NIfTI, or truncated)") from None
    # NIfTI is (C, X, Y, Z); medfed volumes are (C, D, H, W)
    volume = np.moveaxis(volume, -1, 1) if volume.ndim == 4 else volume
    return np.ascontiguousarray(min_max_scale(volume), dtype=np.float32)


def _modality(path: Path) -> str:
    """The DICOM Modality of a file (or a series' first slice); "unknown" when absent."""
    import pydicom

    first = path if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())[0]
    try:
        value = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
    except Exception:  # noqa: BLE001 - it was readable a moment ago; the modality is only informative
        value = None
    return str(value) if value else "unknown"


@dataclass
class CheckReport:
    """The site data check: what is usable, what is not and why (indices into the scan, never paths)."""

    classes: list[str]
    readable: dict[str, int]  # class (or "(unlabelled)") -> readable images
    unreadable: list[dict[str, Any]]  # {"index": i, "reason": ...}
    duplicates: list[list[int]]  # groups of indices whose decoded pixels are identical
    shapes: dict[str, int]  # "C x H x W" -> images
    kinds: dict[str, int]  # dicom/series/nifti/image -> entries
    modalities: dict[str, int]  # DICOM Modality (CT, MR, CR, US ...) -> readable DICOM entries (local report only)
    unknown_labels: dict[str, int]
    missing_files: int
    bad_rows: int
    unlisted: int

    @property
    def usable(self) -> int:
        """Readable labelled images (what supervised training can use)."""
        return sum(n for label, n in self.readable.items() if label != UNLABELLED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes, "readable": self.readable, "usable_labelled": self.usable,
            "unreadable": self.unreadable, "duplicates": self.duplicates, "shapes": self.shapes,
            "kinds": self.kinds, "modalities": self.modalities, "label_problems": {"unknown_labels": self.unknown_labels,
                                                    "rows_for_missing_files": self.missing_files,
                                                    "bad_rows": self.bad_rows, "images_without_row": self.unlisted},
        }


UNLABELLED = "(unlabelled)"


def check_site(root: str | Path, labels: str | Path | None = None, classes: list[str] | None = None) -> CheckReport:
    """Scan and decode every entry; one bad file is counted with its reason, never fatal."""
    scan = scan_site(root, labels, classes)
    readable: Counter[str] = Counter()
    unreadable: list[dict[str, Any]] = []
    shapes: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    digests: dict[str, list[int]] = {}
    for index, entry in enumerate(scan.entries):
        try:
            image = read_entry(root, entry)
        except SiteDataError as exc:
            unreadable.append({"index": index, "reason": str(exc)})
            logger.warning("unreadable file %d (%s): %s", index, entry.path, exc)  # site-local log only
            continue
        readable[entry.label if entry.label is not None else UNLABELLED] += 1
        if entry.kind in ("dicom", "series"):
            modalities[_modality(Path(root) / entry.path)] += 1
        shapes[" x ".join(str(d) for d in image.shape)] += 1
        digest = hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()
        digests.setdefault(digest, []).append(index)
    return CheckReport(
        classes=scan.classes,
        readable=dict(sorted(readable.items())),
        unreadable=unreadable,
        duplicates=[group for group in digests.values() if len(group) > 1],
        shapes=dict(shapes.most_common()),
        kinds=dict(Counter(e.kind for e in scan.entries)),
        modalities=dict(modalities.most_common()),
        unknown_labels=dict(scan.unknown_labels),
        missing_files=scan.missing_files,
        bad_rows=scan.bad_rows,
        unlisted=scan.unlisted,
    )


# --- training data from a folder ---------------------------------------------------------------------------------
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


def _resize(image: np.ndarray, size: int, spatial_dims: int, channels: int) -> np.ndarray:
    """Channel-convert (grey <-> RGB) and resize to ``size`` per spatial axis (area/trilinear interpolation)."""
    import torch
    import torch.nn.functional as F

    if image.ndim - 1 == 2 and spatial_dims == 3:
        image = image[:, None]  # a 2D image as a one-slice volume
    elif image.ndim - 1 == 3 and spatial_dims == 2:
        image = image[:, image.shape[1] // 2]  # a volume's middle slice for a 2D task
    if image.shape[0] != channels:
        if channels == 1:  # RGB -> luminance (ITU-R BT.601)
            image = np.tensordot(np.asarray([0.299, 0.587, 0.114])[: image.shape[0]], image, axes=1)[None]
        else:
            image = np.repeat(image[:1], channels, axis=0)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    shape = (size,) * spatial_dims
    if tuple(tensor.shape[2:]) != shape:
        mode = "area" if all(s >= t for s, t in zip(tensor.shape[2:], shape, strict=True)) else (
            "bilinear" if spatial_dims == 2 else "trilinear")
        kwargs = {} if mode == "area" else {"align_corners": False}
        tensor = F.interpolate(tensor, size=shape, mode=mode, **kwargs)
    return tensor[0].clamp(0.0, 1.0).numpy()


DECODE_VERSION = 1  # bump when decoding changes, so cached images are decoded again


def _cached(root: Path, entry: SiteEntry, cache_dir: Path | None, size: int, dims: int, channels: int) -> np.ndarray:
    """The decoded, resized entry; decoded once per file version (the cache key includes size and mtime)."""
    path = root / entry.path
    if cache_dir is None:
        return read_resized(root, entry, size, dims, channels)
    stamp = [path.resolve().as_posix(), size, dims, channels, DECODE_VERSION]
    for file in ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())):
        stat = file.stat()
        stamp += [file.name, stat.st_size, stat.st_mtime_ns]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    target = Path(cache_dir) / "decoded" / f"{key}.npy"
    if target.is_file():
        try:
            return np.load(target, allow_pickle=False)
        except (OSError, ValueError):
            logger.warning("ignoring a damaged cache entry")
    image = read_resized(root, entry, size, dims, channels)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        np.save(handle, image, allow_pickle=False)
    return image


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
    images, targets, splits, patients = [], [], [], []
    skipped = unlabelled = 0
    for index, entry in enumerate(scan.entries):
        if entry.label is None:
            unlabelled += 1
            continue
        try:
            images.append(_cached(root, entry, Path(cache_dir) if cache_dir else None, image_size, spatial_dims,
                                  channels))
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
    data = ArrayDataset(images=np.stack(images).astype(np.float32), labels=np.asarray(targets, dtype=np.int64))
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
