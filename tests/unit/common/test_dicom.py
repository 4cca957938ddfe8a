"""DICOM decoding on real files: pydicom's shipped test files and the pydicom-data package (CT, MR, CR, US colour,
palette, multi-frame, JPEG 2000 / JPEG-LS / JPEG lossless / RLE), series written by the tests, and broken inputs."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from medfed.common.data.dicom import DicomReadError, read_dicom, read_series

_FOLDERS = [Path(pydicom.__file__).parent / "data" / "test_files"]
try:  # the pydicom-data package (a test dependency) holds the larger files
    import data_store

    _FOLDERS.append(Path(data_store.__file__).parent / "data")
except ImportError:  # pragma: no cover - without it those tests skip
    pass


def _file(name: str) -> Path:
    """A test file by name from the local folders (never downloaded: pydicom's own lookup may try)."""
    for folder in _FOLDERS:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} is not installed (pydicom-data)")


def _linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_ct_gets_its_rescale_then_the_image_range():
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = read_dicom(_file("CT_small.dcm"))
    assert out.shape == (1, 1, 128, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_mr_gets_the_files_first_window():
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    out = read_dicom(_file("MR_small.dcm"))
    np.testing.assert_allclose(out[0, 0], _linear_window(ds.pixel_array.astype(float), centre, width), atol=1e-6)
    assert 0.0 < out.mean() < 1.0
    unwindowed = read_dicom(_file("MR_small.dcm"), voi="minmax")
    assert not np.allclose(out, unwindowed)


def test_voi_lut_sequence_and_modality_lut_sequence_are_applied():
    ds = pydicom.dcmread(_file("vlut_04.dcm"))
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True) / (2**bits - 1)
    np.testing.assert_allclose(read_dicom(_file("vlut_04.dcm"))[0, 0], np.clip(expected, 0, 1), atol=1e-6)

    mlut = pydicom.dcmread(_file("mlut_18.dcm"))
    mapped = apply_modality_lut(mlut.pixel_array, mlut).astype(float)
    np.testing.assert_allclose(read_dicom(_file("mlut_18.dcm"))[0, 0],
                               (mapped - mapped.min()) / (mapped.max() - mapped.min()), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    # the same CR image declared MONOCHROME2: the two readings add up to 1 everywhere
    ds = pydicom.dcmread(_file("RG1_UNCR.dcm"))
    flipped = copy.deepcopy(ds)
    flipped.PhotometricInterpretation = "MONOCHROME2"
    flipped.save_as(tmp_path / "mono2.dcm")
    as_mono1, as_mono2 = read_dicom(_file("RG1_UNCR.dcm")), read_dicom(tmp_path / "mono2.dcm")
    np.testing.assert_allclose(as_mono1 + as_mono2, 1.0, atol=1e-6)


def test_palette_colour_goes_through_the_palette():
    ds = pydicom.dcmread(_file("OBXXXX1A.dcm"))
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    out = read_dicom(_file("OBXXXX1A.dcm"))
    assert out.shape == (1, 3, 600, 800)
    np.testing.assert_allclose(np.moveaxis(out[0], 0, -1), apply_color_lut(ds.pixel_array, ds) / (2**bits - 1),
                               atol=1e-6)
    assert not np.allclose(out[0, 0], out[0, 2])  # really colour


@pytest.mark.parametrize(
    ("encoded", "reference", "atol"),
    [
        ("US1_J2KR.dcm", "US1_UNCR.dcm", 1e-6),  # YBR_RCT in JPEG 2000 lossless == the RGB original
        ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 6 / 255),  # YBR_FULL -> RGB (8-bit rounding)
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 1e-6),  # JPEG lossless (process 14), colour
        ("SC_rgb_rle.dcm", "SC_rgb.dcm", 1e-6),
        ("693_J2KR.dcm", "693_UNCR.dcm", 1e-6),  # CT, JPEG 2000 lossless
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 1e-6),  # JPEG-LS
        ("MR_small_RLE.dcm", "MR_small.dcm", 1e-6),  # RLE
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", 1e-6),  # multi-frame JPEG 2000
        ("emri_small_RLE.dcm", "emri_small.dcm", 1e-6),
        ("MR_small_bigendian.dcm", "MR_small.dcm", 1e-6),
    ],
)
def test_compressed_and_colour_encodings_decode_to_the_original(encoded, reference, atol):
    np.testing.assert_allclose(read_dicom(_file(encoded)), read_dicom(_file(reference)), atol=atol)


def test_multi_frame_files_give_one_entry_per_frame():
    assert read_dicom(_file("emri_small.dcm")).shape == (10, 1, 64, 64)
    assert read_dicom(_file("SC_rgb_2frame.dcm")).shape == (2, 3, 100, 100)
    video = read_dicom(_file("examples_ybr_color.dcm"))  # ultrasound cine, JPEG baseline, YBR_FULL_422
    assert video.shape == (30, 3, 240, 320) and 0.0 <= video.min() and video.max() <= 1.0


# --- broken inputs: clear, PHI-free reasons ----------------------------------------------------------------------
def _broken(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = _file("CT_small.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-5000])  # cut inside the pixel data
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(data[:3000])  # cut before it
    text = tmp_path / "notes.dcm"
    text.write_text("patient notes, not an image\n")
    return {
        "truncated": (truncated, "pixel data does not match the image description"),
        "header only": (header_only, "no pixel data .* cut short"),
        "text": (text, "not a DICOM file"),
        "short pixel data": (_file("MR_truncated.dcm"), "pixel data does not match"),
        "no pixels": (_file("rtplan.dcm"), "no pixel data"),
        "no meta": (_file("no_meta.dcm"), "not a DICOM file"),
    }


@pytest.mark.parametrize("case", ["truncated", "header only", "text", "short pixel data", "no pixels", "no meta"])
def test_broken_files_fail_with_a_reason_and_no_header_value_or_path(tmp_path, case):
    path, reason = _broken(tmp_path)[case]
    with pytest.raises(DicomReadError, match=reason) as caught:
        read_dicom(path)
    message = str(caught.value)
    assert path.name not in message and str(tmp_path) not in message
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    for value in (str(ds.PatientName), str(ds.PatientID), str(ds.get("InstitutionName", "")) or "-", str(ds.StudyDate)):
        assert value not in message


# --- series ------------------------------------------------------------------------------------------------------
def _write_series(folder: Path, positions: list[float], *, series_uid: str = "1.2.3") -> list[Path]:
    """Slices of CT_small whose pixels hold their slice number, at the given z positions, in shuffled files."""
    template = pydicom.dcmread(_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, z in enumerate(positions):
        ds = copy.deepcopy(template)
        pixels = np.full(ds.pixel_array.shape, number * 10, dtype=ds.pixel_array.dtype)
        pixels[0, 0] = 1000  # the same range in every slice
        ds.PixelData = pixels.tobytes()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = len(positions) - number  # deliberately disagrees with the positions
        path = folder / f"file{random.Random(number).randrange(10**6):06d}_{number}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_a_series_is_ordered_by_position_along_the_slice_normal(tmp_path):
    positions = [5.0, -2.5, 10.0, 0.0, 2.5]
    paths = _write_series(tmp_path / "series", positions)
    random.Random(1).shuffle(paths)

    volume = read_series(paths)

    # slice k holds the value 10 k: from the lowest z up they must come as the slice numbers sorted by z
    assert volume.shape == (1, 5, 128, 128)
    expected = np.argsort(positions)  # [1, 3, 0, 4, 2]
    levels = volume[0, :, 5, 5]
    np.testing.assert_allclose(levels / levels.max(), expected / expected.max(), atol=1e-6)


def test_series_problems_are_refused_clearly(tmp_path):
    mixed = _write_series(tmp_path / "a", [0.0, 1.0]) + _write_series(tmp_path / "b", [2.0], series_uid="9.9")
    with pytest.raises(DicomReadError, match="mixes 2 series"):
        read_series(mixed)
    with pytest.raises(DicomReadError, match="same position"):
        read_series(_write_series(tmp_path / "c", [1.0, 1.0]))
    with pytest.raises(DicomReadError, match="slice 1 of 2: not a DICOM file"):
        (tmp_path / "junk.dcm").write_text("junk")
        read_series([_write_series(tmp_path / "d", [0.0])[0], tmp_path / "junk.dcm"])
    with pytest.raises(DicomReadError, match="no DICOM slices"):
        read_series([])


def test_written_files_read_back_with_their_rescale(tmp_path):
    from medfed.common.data.dicom import write_dicom

    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    path = write_dicom(tmp_path / "x.dcm", pixels, rescale=(2.0, -1024.0))
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleSlope) == 2.0 and ds.BitsStored == 16
    np.testing.assert_allclose(read_dicom(path)[0, 0], pixels / pixels.max(), atol=1e-6)  # min..max of 2x - 1024
    with pytest.raises(ValueError, match="needs a 2D uint8 or uint16 array"):
        write_dicom(tmp_path / "y.dcm", np.zeros((2, 2), dtype=np.float32))


# --- expectations computed by hand on tiny files (not by the pydicom functions the reader calls) -------------------
def test_a_voi_lut_sequence_after_the_rescale_by_hand(tmp_path):
    # Prepare: pixels 0..3, rescale 2x + 10 -> 10, 12, 14, 16; a VOI LUT of 7 entries starting at 10, 8 bits
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from medfed.common.data.dicom import write_dicom

    path = write_dicom(tmp_path / "voi.dcm", np.array([[0, 1, 2, 3]], dtype=np.uint16), rescale=(2.0, 10.0))
    ds = pydicom.dcmread(path)
    lut = Dataset()
    lut.LUTDescriptor = [7, 10, 8]
    lut.LUTData = np.array([0, 10, 20, 40, 80, 160, 255], dtype="<u2").tobytes()
    ds.VOILUTSequence = Sequence([lut])
    ds.save_as(path)

    # Execute
    out = read_dicom(path)

    # Assert: 10 -> 0, 12 -> 20, 14 -> 80, 16 -> 255, over the LUT's 8-bit range
    np.testing.assert_allclose(out[0, 0, 0], [0, 20 / 255, 80 / 255, 1.0], atol=1e-6)


def test_a_palette_colour_image_by_hand(tmp_path):
    # Prepare: four pixels with palette indices 0..3 -> black, red, green, blue (16-bit palette entries)
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "palette.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "US", 1, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "PALETTE COLOR", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    full = 65535
    for colour, entries in (("Red", [0, full, 0, 0]), ("Green", [0, 0, full, 0]), ("Blue", [0, 0, 0, full])):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, dtype="<u2").tobytes())
    ds.PixelData = np.array([[0, 1, 2, 3]], dtype=np.uint8).tobytes()
    ds.save_as(tmp_path / "palette.dcm", enforce_file_format=True)

    # Execute
    out = read_dicom(tmp_path / "palette.dcm")

    # Assert: channels R, G, B of the four pixels
    assert out.shape == (1, 3, 1, 4)
    np.testing.assert_allclose(out[0, :, 0, :], [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], atol=1e-6)
