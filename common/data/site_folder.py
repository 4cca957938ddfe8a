"""A hospital's image folder: what is in it (:func:`scan_site`), how one entry is read (:func:`read_entry`), and the
site data check (:func:`check_site`) behind ``medfed hospital check``. The folder as training arrays (decoded,
cached, split) is :mod:`medfed.common.data.site_folder_arrays`.

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
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.data.arrays import min_max_scale
from medfed.common.data.dicom import read_dicom, read_series
from medfed.common.errors import SiteDataError

__all__ = ["CheckReport", "SiteEntry", "SiteScan", "check_site", "image_entries", "read_entry", "read_resized",
           "scan_site"]

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
        raise SiteDataError("the site data folder does not exist or is not a folder; check data_path in the site config (--data-path of `medfed hospital check`).")
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
        raise SiteDataError("the label manifest does not exist; check labels in the site config (--labels of `medfed hospital check`).")
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
