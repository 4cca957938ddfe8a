"""Tests of common.data.medmnist: official npz files (2D grey, 3D), colour and multi-class files, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medfed.common.config import MedMNISTConfig
from medfed.common.data.medmnist import load_medmnist, medmnist_path
from medfed.common.errors import ConfigError, DatasetUnavailableError

DATA_DIR = Path(
    os.environ.get("MEDFED_DATA_DIR", Path(__file__).resolve().parents[4].parent / "shared" / "data" / "medmnist")
)


def _require(name: str) -> MedMNISTConfig:
    if not (DATA_DIR / f"{name}.npz").is_file():
        pytest.skip(f"{name}.npz not found in MEDFED_DATA_DIR ({DATA_DIR}); set MEDFED_DATA_DIR to the MedMNIST folder")
    return MedMNISTConfig(name=name, data_path=str(DATA_DIR))


def _write_npz(root: Path, name: str, image_shape: tuple[int, ...], n_classes: int, label_cols: int = 1) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        labels = np.arange(n * label_cols).reshape(n, label_cols) % n_classes
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(root / f"{name}.npz", **arrays)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(28, "pneumoniamnist.npz"), (64, "pneumoniamnist_64.npz"), (224, "pneumoniamnist_224.npz")],
)
def test_medmnist_path_follows_the_official_names(size: int, expected: str) -> None:
    # Execute
    path = medmnist_path(MedMNISTConfig(data_path="~/somewhere", size=size))

    # Assert
    assert path.name == expected
    assert "~" not in str(path)


def test_breastmnist_loads_as_float_channel_first() -> None:
    # Prepare
    cfg = _require("breastmnist")

    # Execute
    splits = load_medmnist(cfg)

    # Assert
    assert splits.train.images.shape == (546 + 78, 1, 28, 28)
    assert splits.test.images.shape == (156, 1, 28, 28)
    assert splits.train.images.dtype == np.float32
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    assert splits.train.labels.dtype == np.int64 and splits.train.labels.shape == (624,)
    assert (splits.info.n_classes, splits.info.channels, splits.info.spatial_dims) == (2, 1, 2)
    assert splits.info.image_size == 28 and splits.info.task == "binary"


def test_adrenalmnist3d_loads_as_volumes() -> None:
    # Prepare
    cfg = _require("adrenalmnist3d")

    # Execute
    splits = load_medmnist(cfg)

    # Assert
    assert splits.train.images.shape == (1188 + 98, 1, 28, 28, 28)
    assert splits.test.images.shape == (298, 1, 28, 28, 28)
    assert splits.info.spatial_dims == 3


def test_colour_images_become_channel_first(tmp_path: Path) -> None:
    # Prepare
    _write_npz(tmp_path, "dermamnist", (28, 28, 3), n_classes=2)
    raw = np.load(tmp_path / "dermamnist.npz")["train_images"]

    # Execute
    splits = load_medmnist(MedMNISTConfig(name="dermamnist", data_path=str(tmp_path)))

    # Assert
    assert splits.train.images.shape == (26, 3, 28, 28)
    assert splits.info.channels == 3
    np.testing.assert_allclose(splits.train.images[3, 2], raw[3, :, :, 2] / 255.0, rtol=1e-6)


def test_multiclass_labels_give_the_class_count(tmp_path: Path) -> None:
    # Prepare
    _write_npz(tmp_path, "organamnist", (28, 28), n_classes=5)

    # Execute
    splits = load_medmnist(MedMNISTConfig(name="organamnist", data_path=str(tmp_path)))

    # Assert
    assert splits.info.n_classes == 5
    assert splits.info.task == "multiclass"
    assert splits.info.class_names == ("0", "1", "2", "3", "4")


def test_multilabel_files_are_rejected(tmp_path: Path) -> None:
    # Prepare
    _write_npz(tmp_path, "chestmnist", (28, 28), n_classes=2, label_cols=14)

    # Execute / Assert
    with pytest.raises(ConfigError, match="multi-label MedMNIST datasets are not supported"):
        load_medmnist(MedMNISTConfig(name="chestmnist", data_path=str(tmp_path)))


def test_missing_file_says_where_to_put_it(tmp_path: Path) -> None:
    # Prepare
    cfg = MedMNISTConfig(name="pneumoniamnist", data_path=str(tmp_path))

    # Execute
    with pytest.raises(DatasetUnavailableError) as info:
        load_medmnist(cfg)

    # Assert
    message = str(info.value)
    for needed in ("dataset.data_path", "pneumoniamnist.npz", "dataset.download"):
        assert needed in message
    assert str(tmp_path) not in message


def test_missing_file_with_download_but_no_package_says_how_to_install(tmp_path: Path) -> None:
    # Prepare
    try:
        import medmnist  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the medmnist package is installed here; this test covers its absence")
    cfg = MedMNISTConfig(name="pneumoniamnist", data_path=str(tmp_path), download=True)

    # Execute / Assert
    with pytest.raises(DatasetUnavailableError, match=r'pip install "medfed\[download\]"'):
        load_medmnist(cfg)


@pytest.mark.parametrize(
    ("content", "match"),
    [("truncated", "corrupt or truncated"), ("garbage", "corrupt or truncated"), ("missing_keys", "lacks the keys")],
)
def test_bad_files_give_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    # Prepare
    _write_npz(tmp_path, "breastmnist", (28, 28), n_classes=2)
    path = tmp_path / "breastmnist.npz"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:
        np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8))

    # Execute / Assert
    with pytest.raises(DatasetUnavailableError, match=match) as info:
        load_medmnist(MedMNISTConfig(name="breastmnist", data_path=str(tmp_path)))
    assert str(tmp_path) not in str(info.value)
