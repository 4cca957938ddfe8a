"""What a hospital runs locally with a trained model: `medfed hospital explain` (Grad-CAM of any image) and
`medfed hospital rank` (the labelling queue), on real DICOM and PNG files, a broken file among them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.client.local_tools import load_local_model, read_images, uncertainty_scores
from medfed.common.config import compose_config, config_to_yaml
from medfed.common.errors import ConfigError
from medfed.common.models import build_model, save_checkpoint, state_dict_to_numpy
from tests.conftest import DICOM_PATIENT, write_dicom

runner = CliRunner()


@pytest.fixture
def trained(tmp_path):
    """A run folder as `medfed simulate` leaves it: config.yaml and best_model.pt (a model with dropout)."""
    cfg = compose_config(["model.width=8", "model.dropout=0.3", "dataset.image_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    save_checkpoint(run / "best_model.pt", state_dict_to_numpy(model), {"round": 1})
    return run / "best_model.pt"


@pytest.fixture
def pool(tmp_path):
    """Unlabelled images: four DICOM files in a subfolder, one PNG, one broken .dcm."""
    folder = tmp_path / "pool"
    rng = np.random.default_rng(0)
    for i in range(4):
        write_dicom(folder / "us" / f"img{i}.dcm", (rng.random((20, 20)) * 4000).astype(np.uint16))
    Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8)).save(folder / "photo.png")
    (folder / "us" / "broken.dcm").write_bytes(b"not a dicom at all")
    return folder


def test_rank_writes_the_labelling_queue_and_skips_the_broken_file(tmp_path, trained, pool):
    out = tmp_path / "queue.csv"

    result = runner.invoke(app, ["hospital", "rank", "--model", str(trained), "--images", str(pool),
                                 "--out", str(out)])

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert sorted(r["path"] for r in rows) == ["photo.png", "us/img0.dcm", "us/img1.dcm", "us/img2.dcm", "us/img3.dcm"]
    scores = [float(r["entropy_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # most uncertain first
    assert "skipped us/broken.dcm" in result.output
    assert DICOM_PATIENT not in out.read_text()


def test_explain_writes_a_map_per_image_locally(tmp_path, trained, pool):
    out = tmp_path / "maps"

    result = runner.invoke(app, ["hospital", "explain", "--model", str(trained), "--images", str(pool / "us"),
                                 "--out", str(out)])

    assert result.exit_code == 0, result.output
    maps = sorted(out.glob("*.npy"))
    assert len(maps) == 4 and len(list(out.glob("*.png"))) == 4
    assert np.load(maps[0]).shape == (16, 16)  # the model's input size, from the run config


def test_methods_differ_and_mistakes_are_explained(tmp_path, trained, pool):
    local = load_local_model(trained)
    images, names, failed = read_images(pool, local)

    entropy = uncertainty_scores(local, images, "entropy")
    mc = uncertainty_scores(local, images, "mc_dropout", seed=1)
    random_a = uncertainty_scores(local, images, "random", seed=1)

    assert images.shape == (5, 1, 16, 16) and len(names) == 5 and [f for f, _ in failed] == ["us/broken.dcm"]
    assert not np.array_equal(entropy, mc)
    assert np.array_equal(random_a, uncertainty_scores(local, images, "random", seed=1))
    with pytest.raises(ConfigError, match="choose one of"):
        uncertainty_scores(local, images, "confidence")
    (trained.parent / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="--run-config"):
        load_local_model(trained)
