"""Full-resolution sites through the real simulation: a 128 px image folder (medfed's CNN) and 64^3 NIfTI volumes
(MONAI's DenseNet-121) each train one round (issue 25). The images are decoded once into the site cache and read
from there a batch at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.common.data.image_files import npy_layout
from medfed.common.models.weights import load_checkpoint
from tests.e2e.test_simulation import _assert_run_outputs, _medfed

pytestmark = pytest.mark.e2e


def _ultrasound(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BreastMNIST's images and labels when the shared data is here, else a fixed random pattern split by mean."""
    from tests.conftest import shared_medmnist

    if (path := shared_medmnist("breastmnist")) is not None:
        npz = np.load(path)
        return npz["train_images"][:n], npz["train_labels"].reshape(-1)[:n]
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, (images.mean(axis=(1, 2)) > 127).astype(np.int64)


def _trained(run: Path, rounds: int) -> dict:
    summary = _assert_run_outputs(run, rounds)
    final, _ = load_checkpoint(run / "model.pt")
    first, _ = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final.keys() == first.keys()
    return summary


def test_a_128_px_png_folder_federation_trains_a_round(tmp_path: Path) -> None:
    # Prepare: two hospitals' class folders and a test folder of 160 px PNGs (ultrasound upscaled), resized to 128
    from PIL import Image

    images, labels = _ultrasound(72)
    for folder, span in (("hospital-a", range(0, 28)), ("hospital-b", range(28, 56)), ("test", range(56, 72))):
        for i in span:
            (tmp_path / folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((160, 160), Image.BILINEAR).save(tmp_path / folder / str(labels[i])
                                                                                / f"img{i}.png")
    overrides = ["dataset=folder", f"dataset.data_paths=[{tmp_path / 'hospital-a'},{tmp_path / 'hospital-b'}]",
                 f"dataset.test_data_path={tmp_path / 'test'}", "dataset.classes=[0,1]", "dataset.image_size=128",
                 "federation.hospitals=2", "train.rounds=1", "train.batch_size=8",
                 "train.local_epochs=1"]

    # Execute
    result = _medfed(["simulate", "--run-dir", "run", "--cache-dir", "cache", *overrides], tmp_path)

    # Assert: one round over every image, decoded at 128 px into the site cache
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _trained(tmp_path / "run", 1)
    assert sum(s["n_train"] + s["n_val"] for s in summary["sites"].values()) == 56
    cached = sorted((tmp_path / "cache" / "folders" / "decoded").glob("*.npy"))
    assert len(cached) == 72 and {npy_layout(p)[0] for p in cached} == {(1, 128, 128)}


def test_a_64_cubed_nifti_volume_federation_trains_a_round(tmp_path: Path) -> None:
    # Prepare: NIfTI volumes (48^3, resampled to 64^3): class 1 holds a bright ball, class 0 does not
    import nibabel

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij"), axis=-1)
    for folder, count in (("hospital-a", 8), ("hospital-b", 8), ("test", 6)):
        for i in range(count):
            label = i % 2
            volume = rng.normal(100.0, 20.0, size=(48, 48, 48))
            if label:
                centre = rng.integers(14, 34, size=3)
                volume[np.linalg.norm(grid - centre, axis=-1) < 8] += 150.0
            (tmp_path / folder / str(label)).mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(volume.astype(np.int16), np.eye(4)),
                         str(tmp_path / folder / str(label) / f"vol{i}.nii.gz"))
    overrides = ["dataset=folder", f"dataset.data_paths=[{tmp_path / 'hospital-a'},{tmp_path / 'hospital-b'}]",
                 f"dataset.test_data_path={tmp_path / 'test'}", "dataset.classes=[0,1]", "dataset.spatial_dims=3",
                 "dataset.image_size=64", "federation.hospitals=2", "train.rounds=1", "train.batch_size=4",
                 "train.local_epochs=1",
                 "model=densenet121", "model.width=4"]

    # Execute
    result = _medfed(["simulate", "--run-dir", "run", "--cache-dir", "cache", *overrides], tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _trained(tmp_path / "run", 1)
    assert sum(s["n_train"] + s["n_val"] for s in summary["sites"].values()) == 16
    cached = sorted((tmp_path / "cache" / "folders" / "decoded").glob("*.npy"))
    assert len(cached) == 22 and {npy_layout(p)[0] for p in cached} == {(1, 64, 64, 64)}
