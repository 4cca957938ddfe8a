"""`medfed simulate` checks the hardware its config asks for before Flower (or Ray) starts."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.common.config import compose_config
from medfed.common.errors import ConfigError
from medfed.simulation import launcher

runner = CliRunner()


def test_simulate_refuses_a_model_too_big_for_the_declared_memory(tmp_path, no_simulation_runtime):
    # Execute
    result = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"),
                                 "dataset.n_train=240", "dataset.n_test=60", "train.device_memory_gb=0.01"])

    # Assert
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "train.device_memory_gb=0.01 on cpu: training this model needs about" in text
    assert "train.batch_size" in text and "privacy.max_physical_batch_size" in text
    assert not no_simulation_runtime and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_that_fits_the_declared_memory_passes(tmp_path):
    cfg = compose_config(["dataset.n_train=240", "dataset.n_test=60", "train.device_memory_gb=2"])
    assert launcher.check_hardware(cfg, tmp_path / "c") == 0  # no GPU asked of Ray


@pytest.mark.parametrize(
    ("overrides", "cuda", "match"),
    [
        (["federation.gpus_per_hospital=0.5"], 0, "federation.gpus_per_hospital=0.5 asks Ray for GPUs, but this "
                                                  "machine has no CUDA device"),
        (["train.device=cuda"], 0, "train.device='cuda' but this machine has no CUDA device"),
        (["train.device=cuda"], 1, "train.device=cuda but federation.gpus_per_hospital=0: Ray hides the GPUs"),
        (["federation.gpus_per_hospital=2"], 1, r"federation.gpus_per_hospital=2 exceeds the 1 GPU\(s\)"),
        (["train.amp=fp16"], 0, "train.amp=fp16 on cpu"),
    ],
)
def test_gpus_the_machine_lacks_are_refused(tmp_path, monkeypatch, overrides, cuda, match):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)

    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        launcher.check_hardware(compose_config(overrides), tmp_path / "c")


def test_hospitals_get_their_gpu_fraction(tmp_path, monkeypatch):
    # Prepare: two GPUs (faked), two hospitals per GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    # Execute / Assert: Ray is told of both GPUs
    assert launcher.check_hardware(compose_config(["federation.gpus_per_hospital=0.5"]), tmp_path / "c") == 2


def test_gpus_per_hospital_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"federation.gpus_per_hospital=-1.0 is out of range"):
        compose_config(["federation.gpus_per_hospital=-1"])
