"""Tests of common.data.image_files: a site's decoded images on disk, read only when indexed."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.common.data.arrays import ArrayDataset
from medfed.common.data.image_files import ImageFiles, iter_chunks, npy_layout
from medfed.common.errors import SiteDataError


def _files(folder: Path, n: int = 6, shape: tuple[int, ...] = (1, 3, 3)) -> tuple[ImageFiles, np.ndarray]:
    """``n`` images, one .npy file each, and the same images as one in-memory array."""
    stack = np.random.default_rng(0).random((n, *shape), dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"k{i:03d}" for i in range(n)]
    for key, image in zip(keys, stack, strict=True):
        np.save(folder / f"{key}.npy", image)
    return ImageFiles(folder, np.asarray(keys), shape, np.float32), stack


@pytest.mark.parametrize(
    "key",
    [3, -1, slice(1, 5), slice(None, None, -2), np.array([4, 0, 4]), [2, 1], np.array([True, False] * 3),
     torch.tensor([5, 2]), (slice(0, 2), 0), (np.array([1, 3]), slice(None), 1)],
    ids=["int", "negative", "slice", "reverse-step", "repeats", "list", "mask", "tensor", "rows-then-channel",
         "rows-then-more"],
)
def test_indexing_reads_what_the_stacked_array_holds(tmp_path, key) -> None:
    # Prepare
    files, stack = _files(tmp_path / "decoded")
    expected = stack[key.numpy() if isinstance(key, torch.Tensor) else key]

    # Execute
    got = files[key]

    # Assert
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_shape_views_and_pickling_hold_no_pixels(tmp_path) -> None:
    # Prepare
    files, stack = _files(tmp_path / "decoded")

    # Execute
    view = files.subset(np.array([5, 1, 3]))
    joined = ImageFiles.concat([view, files.subset([0])])
    restored = pickle.loads(pickle.dumps(joined))

    # Assert
    assert files.shape == (6, 1, 3, 3) and files.ndim == 4 and len(files) == 6 and files.nbytes == stack.nbytes
    assert view.shape == (3, 1, 3, 3)
    np.testing.assert_array_equal(np.asarray(restored), stack[[5, 1, 3, 0]])
    assert len(pickle.dumps(joined)) < stack[[5, 1, 3, 0]].nbytes + 1000  # names, not images
    assert [c.shape[0] for c in iter_chunks(files, rows=4)] == [4, 2]
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(files, rows=4))), stack)
    np.testing.assert_array_equal(np.stack(list(files)), stack)


def test_out_of_range_and_bad_keys_are_index_errors(tmp_path) -> None:
    files, _ = _files(tmp_path / "decoded")
    for key in (6, -7, np.array([0, 6]), np.array([True, False]), np.array([0.5])):
        with pytest.raises(IndexError):
            files[key]


def test_a_file_changed_under_a_run_says_what_to_do_without_naming_it(tmp_path) -> None:
    # Prepare: one file removed, one rewritten with another shape
    files, _ = _files(tmp_path / "decoded-secret-patient")
    (tmp_path / "decoded-secret-patient" / "k001.npy").unlink()
    np.save(tmp_path / "decoded-secret-patient" / "k002.npy", np.zeros((1, 4, 4), np.float32))

    # Execute / Assert
    for index, reason in ((1, "missing or damaged"), (2, r"shape \(1, 4, 4\), not \(1, 3, 3\)")):
        with pytest.raises(SiteDataError, match=reason) as raised:
            files[index]
        assert "secret" not in str(raised.value) and "k00" not in str(raised.value)
        assert "Start the hospital again" in str(raised.value)


def test_the_npy_header_is_read_without_the_data_and_a_torn_file_is_refused(tmp_path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((2, 5, 7), np.float32))
    assert npy_layout(path) == ((2, 5, 7), np.dtype(np.float32))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="shorter"):
        npy_layout(path)
    np.save(path, np.asfortranarray(np.zeros((2, 5), np.float32)))
    with pytest.raises(ValueError, match="C-ordered"):
        npy_layout(path)


def test_a_dataset_of_files_subsets_and_concatenates_on_disk(tmp_path) -> None:
    # Prepare
    files, stack = _files(tmp_path / "decoded")
    data = ArrayDataset(images=files, labels=np.arange(6, dtype=np.int64) % 2)  # type: ignore[arg-type]

    # Execute
    picked = data.subset(np.array([4, 2]))
    joined = ArrayDataset.concat([picked, data.subset(np.array([0]))])
    mixed = ArrayDataset.concat([picked, ArrayDataset(stack[:1], np.zeros(1, np.int64))])

    # Assert: views of the same files while every part is on disk; a mix with memory becomes an array
    assert isinstance(picked.images, ImageFiles) and isinstance(joined.images, ImageFiles)
    np.testing.assert_array_equal(joined.images[:], stack[[4, 2, 0]])
    assert joined.labels.tolist() == [0, 0, 0]
    assert isinstance(mixed.images, np.ndarray)
    np.testing.assert_array_equal(mixed.images, stack[[4, 2, 0]])
