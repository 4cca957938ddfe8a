"""A site's decoded images on its own disk, read on demand: what lets a site larger than memory train.

A folder site's images are decoded once into the site cache, one ``.npy`` file per image
(:mod:`medfed.common.data.site_folder_arrays`). :class:`ImageFiles` stands for the stack of those files without
reading them: ``images[i]`` reads one file, ``images[indices]`` (an index array, a slice, a boolean mask) reads just
those and returns an ordinary numpy array, and a subset (``images.subset(indices)``) is another view of the same
files. Training, evaluation and inference index their batches, so memory is bounded by the batch, not by the site.
Reads go through ``read()``, not ``mmap``: the kernel's page cache keeps hot files fast without counting towards
the process's resident memory, and a process under ``ulimit -v`` maps nothing it does not use.

``np.asarray(images)`` still works (it reads every file); code that needs every pixel at once (a duplicate digest,
a small test set) may use it, at the memory it costs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.errors import SiteDataError

__all__ = ["ImageFiles", "iter_chunks", "npy_layout"]

logger = logging.getLogger(__name__)


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype in a ``.npy`` file's header (the data is not read); checks the file holds all of it.

    Raises:
        ValueError: not a C-ordered ``.npy`` file, or shorter than its header says (a torn write).
    """
    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        offset = handle.tell()
    if fortran or dtype.hasobject:
        raise ValueError("not a C-ordered numeric array")
    if path.stat().st_size < offset + math.prod(shape) * dtype.itemsize:
        raise ValueError("the file is shorter than its header says")
    return tuple(shape), dtype


class ImageFiles:
    """A read-only stack of same-shaped images, one ``.npy`` file each under ``folder`` (``keys[i]`` names row
    ``i``'s file, ``KEY.npy``), read only when indexed. Picklable: it holds names, never pixels."""

    def __init__(self, folder: str | Path, keys: np.ndarray, image_shape: tuple[int, ...], dtype: Any) -> None:
        self.folder = Path(folder)
        self.keys = np.asarray(keys, dtype=str)
        if self.keys.ndim != 1:
            raise ValueError(f"keys must be a 1-D array of file names; got shape {self.keys.shape}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keys), *self.image_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.image_shape)

    @property
    def nbytes(self) -> int:
        """What reading every image would take in memory."""
        return len(self.keys) * math.prod(self.image_shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} images of {self.image_shape} {self.dtype.name})"

    def _positions(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        positions = np.asarray(key.numpy() if hasattr(key, "numpy") else key)
        if positions.dtype == bool:
            if positions.shape != (len(self),):
                raise IndexError(f"a boolean mask of shape {positions.shape} for {len(self)} images.")
            return np.flatnonzero(positions)
        if positions.dtype.kind not in "iu":
            raise IndexError(f"images are indexed by integers, slices or boolean masks; got {positions.dtype}.")
        positions = positions.astype(np.int64, copy=False)
        if positions.size and (positions.max() >= len(self) or positions.min() < -len(self)):
            raise IndexError(f"an index out of range for {len(self)} images.")
        return np.where(positions < 0, positions + len(self), positions)

    def _read(self, key: str) -> np.ndarray:
        path = self.folder / f"{key}.npy"
        try:
            image = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SiteDataError(
                f"a cached image of the site is missing or damaged ({type(exc).__name__}); the site cache changed "
                "while it was in use. Start the hospital again (the cache is rebuilt from the image folder)."
            ) from None
        if image.shape != self.image_shape:
            raise SiteDataError(
                f"a cached image of the site has shape {image.shape}, not {self.image_shape}; the site cache "
                "changed while it was in use. Start the hospital again (the cache is rebuilt from the image folder)."
            )
        return image.astype(self.dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"image {index} out of range for {len(self)} images.")
            image = self._read(self.keys[index])
            return image[rest] if rest else image
        positions = self._positions(key)
        out = np.empty((len(positions), *self.image_shape), dtype=self.dtype)
        for row, position in enumerate(positions):
            out[row] = self._read(self.keys[position])
        return out[(slice(None), *rest)] if rest else out

    def subset(self, indices: Any) -> ImageFiles:
        """The images at ``indices``, as a view of the same files (nothing is read)."""
        return ImageFiles(self.folder, self.keys[self._positions(indices)], self.image_shape, self.dtype)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        logger.debug("reading all %d images of %s into memory", len(self), self.folder.name)
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]

    @staticmethod
    def concat(parts: list[ImageFiles]) -> ImageFiles:
        """The parts' images in order, as one view (they must share folder, shape and dtype)."""
        first = parts[0]
        if any(p.folder != first.folder or p.image_shape != first.image_shape or p.dtype != first.dtype
               for p in parts):
            raise ValueError("ImageFiles.concat needs parts from one folder with one image shape and dtype.")
        return ImageFiles(first.folder, np.concatenate([p.keys for p in parts]), first.image_shape, first.dtype)


def iter_chunks(images: Any, rows: int = 256) -> Iterator[np.ndarray]:
    """``images`` (an array or :class:`ImageFiles`) ``rows`` at a time, as contiguous arrays."""
    for start in range(0, len(images), rows):
        yield np.ascontiguousarray(images[start:start + rows])
