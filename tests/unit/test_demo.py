"""`medfed demo`: its runs share data, federation and budget; bad input fails before any run starts."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from medfed.cli.demo import DEMO_FEDERATION, DemoRow, demo_steps, demo_table
from medfed.cli.display import make_console
from medfed.cli.main import app
from medfed.common.config import compose_config

runner = CliRunner()


def test_every_run_reads_the_same_data_and_federation_and_an_override_replaces_the_recipe(tmp_path):
    # Execute
    steps = demo_steps(tmp_path, extra=["train.rounds=2"])

    # Assert
    assert [s.key for s in steps] == ["local", "fedavg", "dp"]
    assert [s.baseline for s in steps] == [True, False, False]
    for step in steps:
        assert f"dataset.data_path={tmp_path}" in step.overrides
        assert set(DEMO_FEDERATION) <= set(step.overrides)
        assert [o for o in step.overrides if o.startswith("train.rounds=")] == ["train.rounds=2"]
        cfg = compose_config(step.overrides)  # Hydra takes each (a key given twice would be refused)
        assert (cfg.dataset.name, cfg.federation.hospitals, cfg.train.rounds) == ("breastmnist", 5, 2)
    assert compose_config(steps[0].overrides).model == compose_config(steps[1].overrides).model
    assert compose_config(steps[2].overrides).privacy.name == "dp"
    assert [s.key for s in demo_steps(tmp_path, dp=False)] == ["local", "fedavg"]


def test_the_table_shows_each_row_with_its_numbers():
    rows = [DemoRow("local", "local-only", "alone", 0.61, 0.55, (0.43, 0.78), None, "smallcnn 8x8", None, 22.0,
                    "r/local"),
            DemoRow("fedavg", "federated (FedAvg)", "together", 0.834, 0.84, None, 8, "smallcnn 8x8", None, 35.0,
                    "r/fedavg"),
            DemoRow("dp", "federated + DP", "under DP", math.nan, 0.73, None, 3, "scatternet 20x1", 7.97, 41.0,
                    "r/dp")]
    console = make_console()
    with console.capture() as captured:
        console.print(demo_table(rows, "demo"))
    text = captured.get()
    assert "0.610 (0.43-0.78)" in text and "0.834" in text and "7.97" in text
    assert "federated + DP" in text and "scatternet 20x1" in text and " - " in text  # an undefined AUC: '-'


def test_a_bad_override_exits_2_before_any_run_starts(tmp_path):
    result = runner.invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "train.rounds=0"])
    assert result.exit_code == 2, result.output
    assert "train.rounds=0 is out of range" in " ".join(result.output.split())
    assert not (tmp_path / "demo").exists()


def test_a_data_path_without_breastmnist_exits_3_and_says_so(tmp_path):
    result = runner.invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "c"),
                                 "--data-path", str(tmp_path / "nowhere")])
    assert result.exit_code == 3, result.output
    assert "breastmnist.npz" in " ".join(result.output.split())
    assert not (tmp_path / "demo" / "fedavg").exists()
