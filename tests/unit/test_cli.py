"""The `medfed` command: bad input fails before anything starts, with the key, the value and the choices."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["simulate", "federation.partition=skewed"], "federation.partition='skewed' is not allowed"),
        (["simulate", "dataset=imagenet"], "dataset='imagenet' is not a known dataset option"),
        (["baseline", "local", "train.rounds=0"], "train.rounds=0 is out of range"),
        (["baseline", "centralized", "model.name=vit"], "model.name='vit' is not a registered model"),
    ],
)
def test_bad_config_exits_2_before_anything_starts(tmp_path, args, match):
    # Execute
    result = runner.invoke(app, [args[0], *args[1:-1], "--run-dir", str(tmp_path / "run"), args[-1]])

    # Assert
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_dataset_file_says_where_to_put_it(tmp_path):
    # Execute
    result = runner.invoke(
        app,
        ["baseline", "local", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"),
         "dataset=medmnist", "dataset.name=breastmnist", f"dataset.data_path={tmp_path / 'nowhere'}"],
    )

    # Assert
    text = " ".join(result.output.split())
    assert result.exit_code == 3, result.output
    assert "breastmnist.npz" in text and "dataset.data_path" in text and "dataset.download" in text


def test_resume_refuses_overrides(tmp_path):
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "train.rounds=9"])
    assert result.exit_code == 2
    assert "--resume continues a run with the config it was started with" in " ".join(result.output.split())


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "already holds a run" in " ".join(result.output.split())


def test_config_show_prints_every_group():
    result = runner.invoke(app, ["config", "show", "train.rounds=7"])
    assert result.exit_code == 0
    assert "rounds: 7" in result.output
    for group in ("dataset:", "model:", "strategy:", "federation:", "train:", "privacy:"):
        assert group in result.output


def test_baselines_refuse_a_self_supervised_task(tmp_path):
    result = runner.invoke(app, ["baseline", "local", "--run-dir", str(tmp_path / "run"), "task=ssl"])

    assert result.exit_code != 0
    assert "no local baseline" in result.output


def test_weights_fetch_prints_the_local_file_and_fails_clearly_offline(tmp_path):
    import torch

    source = tmp_path / "encoder.pt"
    torch.save({"encoder.conv.weight": torch.zeros(2, 1, 3, 3)}, source)

    result = runner.invoke(app, ["weights", "fetch", source.as_uri(), "--dir", str(tmp_path / "w")])

    assert result.exit_code == 0, result.output
    assert f"model.pretrained={tmp_path / 'w' / 'encoder.pt'}" in result.output
    offline = runner.invoke(app, ["weights", "fetch", "http://127.0.0.1:9/r.pth", "--dir", str(tmp_path / "w")])
    assert offline.exit_code != 0 and "Offline?" in offline.output
