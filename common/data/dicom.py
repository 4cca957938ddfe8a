"""DICOM images and series to model-ready arrays, with pydicom (and the pylibjpeg plugins for compressed data).

:func:`read_dicom` turns one file into float32 frames ``(F, C, H, W)`` in ``[0, 1]``:

- greyscale (MONOCHROME1/2): the modality LUT (rescale slope/intercept or a Modality LUT Sequence) gives the
  stored values their meaning (e.g. Hounsfield units); then the VOI transform chosen at the site: the file's VOI
  LUT Sequence, or its first window (centre/width, LINEAR or SIGMOID as the file says), or, with neither, the
  min..max of the image. MONOCHROME1 (bright = low values, common in CR/DX) is inverted so bright means dense in
  every image;
- colour: pydicom converts YBR_* to RGB; PALETTE COLOR goes through the file's palette; the stored range scales to
  ``[0, 1]``;
- multi-frame files give one frame per entry.

:func:`read_series` assembles single-frame slices of one series into a volume ``(1, D, H, W)`` ordered along the
slice normal by ImagePositionPatient (InstanceNumber when positions are absent), windowed with one VOI for the whole
volume.

Errors (:class:`DicomReadError`) say what is wrong in fixed words and counts, never with a value from the file's
header or its path (a path may hold a patient's name): the caller logs the path locally and counts the file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.data.arrays import min_max_scale
from medfed.common.errors import SiteDataError

__all__ = ["DicomReadError", "read_dicom", "read_series", "write_dicom"]

logger = logging.getLogger(__name__)

_GREY = ("MONOCHROME1", "MONOCHROME2")


class DicomReadError(SiteDataError):
    """A DICOM file or series cannot be turned into an image; the reason carries no header value and no path."""


def _dataset(path: Path, *, pixels: bool = True):  # noqa: ANN202 - pydicom's Dataset, imported lazily
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise DicomReadError("not a DICOM file (no DICOM header; is it another format with a .dcm name?)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DicomReadError(f"unreadable DICOM file ({type(exc).__name__}: truncated or corrupt)") from None
    if pixels and not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomReadError(
            "the DICOM file has no pixel data (a non-image object such as a report, or a file cut short before its "
            "pixels)"
        )
    return ds


def _stored(ds) -> np.ndarray:  # noqa: ANN001
    """The decoded stored values: (F, H, W) grey or (F, H, W, 3) colour (YBR converted to RGB by pydicom)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about fixable header quirks; the result is checked
            array = np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError) as exc:
        name = getattr(syntax, "name", "unknown")  # the transfer syntax names a standard encoding: no PHI
        logger.debug("pixel decoding failed", exc_info=exc)
        raise DicomReadError(
            f"cannot decode pixel data compressed as {name!r}: no installed decoder read it (install medfed's "
            "dependencies, which include the pylibjpeg plugins, or the file is damaged)"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise DicomReadError(f"the pixel data does not match the image description ({type(exc).__name__})") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1
    if frames == 1 and array.ndim == (3 if colour else 2):
        array = array[None]
    if array.ndim != (4 if colour else 3):
        raise DicomReadError(f"unexpected pixel array layout ({array.ndim} dimensions for {frames} frame(s))")
    return array


def _window(ds) -> tuple[float, float, str] | None:  # noqa: ANN001
    """The file's first VOI window (centre, width, function), if any."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)

    try:
        centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return (centre, width, function) if width >= 1 else None


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM's VOI window (PS3.3 C.11.2.1.2), to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    return np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _grey(ds, stored: np.ndarray, voi: str) -> np.ndarray:  # noqa: ANN001
    """Modality LUT, VOI, MONOCHROME1 inversion: (F, H, W) in [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    window = _window(ds) if voi == "auto" else None
    if voi == "auto" and "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        bits = int(lut.LUTDescriptor[2]) if len(lut.LUTDescriptor) > 2 else 16
        scaled = np.clip(out / float(2**bits - 1), 0.0, 1.0)
    elif window is not None:
        scaled = _apply_window(values, *window)
    else:
        scaled = np.stack([min_max_scale(frame) for frame in values])
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled


def _colour(ds, stored: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """(F, H, W, 3) RGB in [0, 1]."""
    if stored.dtype.kind == "f":
        return np.stack([min_max_scale(frame) for frame in stored])
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    return np.clip(stored.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)


def read_dicom(path: str | Path, *, voi: str = "auto") -> np.ndarray:
    """One DICOM file as float32 frames ``(F, C, H, W)`` in ``[0, 1]`` (C = 1 grey, 3 colour).

    ``voi="auto"`` applies the file's VOI LUT or window when it has one; ``"minmax"`` ignores them.

    Raises:
        DicomReadError: not DICOM, no pixel data, an undecodable compression, truncated pixel data.
    """
    if voi not in ("auto", "minmax"):
        raise ValueError(f"voi={voi!r}; choose 'auto' or 'minmax'.")
    ds = _dataset(Path(path))
    stored = _stored(ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = np.asarray(apply_color_lut(stored, ds))
        except (ValueError, AttributeError, KeyError, IndexError):
            raise DicomReadError("PALETTE COLOR image without a usable palette") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        frames = np.clip(rgb.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)
    elif photometric in _GREY:
        if stored.ndim != 3:
            raise DicomReadError("greyscale image with more than one sample per pixel")
        frames = _grey(ds, stored, voi)[..., None]
    elif stored.ndim == 4:  # RGB, or YBR_* already converted to RGB by pydicom
        frames = _colour(ds, stored)
    else:
        raise DicomReadError("unsupported photometric interpretation for a colour image")
    return np.ascontiguousarray(np.moveaxis(frames, -1, 1), dtype=np.float32)


def _slice_position(ds) -> float | None:  # noqa: ANN001
    """The slice's position along its normal (from ImageOrientationPatient and ImagePositionPatient)."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))


def read_series(paths: Sequence[str | Path], *, voi: str = "auto") -> np.ndarray:
    """Single-frame greyscale slices of one series as a float32 volume ``(1, D, H, W)`` in ``[0, 1]``.

    Slices are ordered along the slice normal by ImagePositionPatient (by InstanceNumber when a slice has no
    position). The modality LUT is applied per slice; one VOI (the first slice's window, or the volume's min..max)
    for the whole volume keeps intensities comparable across slices.

    Raises:
        DicomReadError: no slices, slices of several series, differing slice sizes, a colour or multi-frame
            slice, two slices at one position, or any :func:`read_dicom` error (with the slice's index).
    """
    from pydicom.pixels import apply_modality_lut

    if not paths:
        raise DicomReadError("the series folder holds no DICOM slices")
    slices = []
    for index, path in enumerate(paths):
        try:
            ds = _dataset(Path(path))
            stored = _stored(ds)
        except DicomReadError as exc:
            raise DicomReadError(f"slice {index} of {len(paths)}: {exc}") from None
        if stored.shape[0] != 1 or str(getattr(ds, "PhotometricInterpretation", "")) not in _GREY:
            raise DicomReadError(f"slice {index} of {len(paths)} is multi-frame or colour; a series needs "
                                 "single-frame greyscale slices")
        order = _slice_position(ds)
        instance = getattr(ds, "InstanceNumber", None)
        key = (0, order) if order is not None else (1, float(instance) if instance is not None else float(index))
        values = np.asarray(apply_modality_lut(stored[0], ds), dtype=np.float64)
        slices.append((key, str(getattr(ds, "SeriesInstanceUID", "")), values, ds))
    if len({uid for _, uid, _, _ in slices}) > 1:
        raise DicomReadError(f"the folder mixes {len({uid for _, uid, _, _ in slices})} series; give one series "
                             "per folder")
    if len({values.shape for _, _, values, _ in slices}) > 1:
        raise DicomReadError("the slices of the series have different sizes")
    slices.sort(key=lambda item: item[0])
    keys = [key for key, _, _, _ in slices]
    if len(set(keys)) < len(keys):
        raise DicomReadError("two slices of the series lie at the same position (a duplicate slice?)")
    volume = np.stack([values for _, _, values, _ in slices])
    first = slices[0][3]
    window = _window(first) if voi == "auto" else None
    scaled = _apply_window(volume, *window) if window is not None else min_max_scale(volume)
    if first.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.ascontiguousarray(scaled[None], dtype=np.float32)


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    patient_name: str = "",
    patient_id: str = "",
    modality: str = "OT",
    z: float | None = None,
    series: str | None = None,
    rescale: tuple[float, float] | None = None,
) -> Path:
    """Write a greyscale secondary-capture DICOM file (MONOCHROME2, uint8 or uint16 ``pixels``): for demo sites
    (``medfed hospital export-demo --format dicom``), tests and benchmarks. ``z`` and ``series`` make it a slice
    of a series (axial orientation); ``rescale`` = (slope, intercept) sets the modality LUT."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    array = np.ascontiguousarray(pixels)
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_dicom() needs a 2D uint8 or uint16 array; got {array.dtype} {array.shape}.")
    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = patient_name, patient_id, modality
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    bits = 8 * array.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if z is not None:
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, z]
        ds.SeriesInstanceUID = series or "1.2.3"
    ds.PixelData = array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
