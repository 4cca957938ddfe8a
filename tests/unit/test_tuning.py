"""medfed tune's parts that need no simulation: the search space (default and from a file), recipe files
(--config-file), the test split withheld by the loader. The search itself runs in tests/e2e/test_tune.py."""

from __future__ import annotations

import pytest
import yaml

from medfed.common.config import compose_config, overrides_with_config_file, read_config_file, write_config_file
from medfed.common.data import WithheldTestSplit, load_dataset_info, load_test_set
from medfed.common.errors import ConfigError
from medfed.simulation.tuning import Param, default_space, read_space, space_from

SMALL = ["dataset.n_train=120", "dataset.n_test=40", "federation.hospitals=2"]


def test_a_space_file_gives_float_int_log_and_choice_ranges(tmp_path):
    # Prepare
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ntrain.local_epochs: {low: 1, high: 4}\n"
                    "train.batch_size: [16, 32]\ntrain.optimizer: {choices: [adamw, sgd]}\n")

    # Execute
    space = {p.key: p for p in read_space(path)}

    # Assert
    assert space["train.lr"] == Param("train.lr", 1e-4, 1e-2, log=True)
    assert space["train.local_epochs"].integer and (space["train.local_epochs"].low, space["train.local_epochs"].high) == (1, 4)
    assert space["train.batch_size"].choices == (16, 32) and space["train.optimizer"].choices == ("adamw", "sgd")


@pytest.mark.parametrize(("text", "says"), [
    ("train.lr: {low: 0.1, high: 0.01}", "is not a range"),
    ("train.lr: {low: 0, high: 1, log: true}", "both > 0 with log"),
    ("train.lr: {low: 0.1, high: 1, step: 2}", "unknown fields \\['step'\\]"),
    ("train.lr: 0.1", "is not a search range"),
    ("train.batch_size: {choices: []}", "non-empty list"),
    ("- train.lr", "must be a mapping of config keys"),
])
def test_a_bad_space_file_is_refused_naming_the_key_and_what_is_allowed(tmp_path, text, says):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")

    with pytest.raises(ConfigError, match=says):
        read_space(path)


def test_the_default_space_follows_the_strategy_and_privacy_and_overrides_pin_keys():
    # Execute
    fedprox = {p.key for p in default_space(compose_config([*SMALL, "strategy=fedprox"]))}
    fedadam = {p.key for p in default_space(compose_config([*SMALL, "strategy=fedadam"]))}
    dp = {p.key for p in default_space(compose_config([*SMALL, "privacy=dp"]))}
    kept, pinned = space_from("default", compose_config(SMALL), [*SMALL, "train.lr=0.01"])

    # Assert: each strategy's own knobs are searched, DP adds the clipping norm, an override is not searched
    assert "strategy.mu" in fedprox and {"strategy.eta", "strategy.tau"} <= fedadam
    assert "privacy.max_grad_norm" in dp and "privacy.max_grad_norm" not in fedprox
    assert "train.augment.enabled" in fedprox and "train.augment.enabled" in dp
    assert pinned == ["train.lr"] and "train.lr" not in {p.key for p in kept}
    # local work is searched in the recipe's unit: steps by default, epochs under DP-SGD or an epoch recipe
    assert "train.local_steps" in fedprox and "train.local_epochs" not in fedprox
    assert "train.local_epochs" in dp and "train.local_steps" not in dp
    assert "train.local_epochs" in {p.key for p in default_space(compose_config([*SMALL, "train.local_epochs=2"]))}
    # every default range composes at both ends, and every choice (a key that does not exist would be refused);
    # the keys are independent, so each config takes one value of every key at once
    for extra in (["strategy=fedadam", "privacy=dp"], ["strategy=fedprox"]):
        space = default_space(compose_config([*SMALL, *extra]))
        for i in range(max(len(p.choices or (p.low, p.high)) for p in space)):
            values = [f"{p.key}={(p.choices or (p.low, p.high))[min(i, len(p.choices or (1, 2)) - 1)]}"
                      for p in space]
            cfg = compose_config([*SMALL, *extra, *values])
            assert cfg.train.batch_size in (16, 32, 64) and cfg.train.lr in (1e-4, 3e-2)
            assert cfg.train.augment.enabled is (i > 0)


def test_a_recipe_file_round_trips_and_the_command_line_wins(tmp_path):
    # Prepare
    path = tmp_path / "best.yaml"
    write_config_file(path, ["train.lr=0.003", "train.rounds=4"], "medfed tune: best of 3 trials\ntrial 1")

    # Execute
    read = read_config_file(path)
    merged = overrides_with_config_file(path, ["train.rounds=7"])

    # Assert: comments kept, overrides in order, the command line's last (Hydra: the later wins)
    text = path.read_text()
    assert text.startswith("# medfed tune: best of 3 trials\n# trial 1\n") and yaml.safe_load(text)["overrides"] == read
    assert read == ["train.lr=0.003", "train.rounds=4"]
    assert compose_config(merged).train.rounds == 7 and compose_config(merged).train.lr == pytest.approx(0.003)


def test_a_run_directorys_overrides_json_is_a_recipe_file(tmp_path):
    path = tmp_path / "overrides.json"
    path.write_text('[\n "train.rounds=3",\n "train.lr=0.01"\n]\n')

    assert read_config_file(path) == ["train.rounds=3", "train.lr=0.01"]


@pytest.mark.parametrize(("text", "says"), [
    ("train: {lr: 0.1}", "has the keys \\['train'\\]"),
    ("overrides: [train.lr]", "list of key=value overrides"),
    ("{{{", "could not be read as YAML"),
])
def test_a_bad_recipe_file_is_refused_saying_what_it_must_hold(tmp_path, text, says):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=says):
        read_config_file(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_config_file(tmp_path / "missing.yaml")


def test_a_run_that_withholds_the_test_split_cannot_load_it_and_still_knows_the_dataset(tmp_path):
    # Prepare
    withheld = compose_config([*SMALL, "evaluate.test_split=false"])

    # Execute / Assert: the loader refuses, saying why and how to get test metrics; the dataset's description comes
    # from a hospital's data
    with pytest.raises(WithheldTestSplit, match="evaluate.test_split=true"):
        load_test_set(withheld, cache_dir=tmp_path)
    info = load_dataset_info(withheld, cache_dir=tmp_path)
    assert info == load_test_set(compose_config(SMALL), cache_dir=tmp_path)[0]


@pytest.mark.parametrize("extra, says", [
    ([], "is not a coordinator directory; create it with `medfed coordinator init`"),  # checked before any trial
    (["--parallel", "2"], "--parallel 2 with --dir: in a deployment the trials run one at a time"),
    (["--state-dir", "s"], "--state-dir with --dir: in a deployment each hospital keeps its own"),
    (["--cache-dir", "c"], "--cache-dir with --dir"),
])
def test_a_deployment_search_refuses_the_options_only_a_simulation_honours(tmp_path, extra, says):
    from typer.testing import CliRunner

    from medfed.cli.main import app

    done = CliRunner().invoke(app, ["tune", "--dir", str(tmp_path), "--trials", "2", "--out", str(tmp_path / "t"),
                                    *extra], env={"COLUMNS": "300"})
    assert done.exit_code != 0 and says in " ".join(done.output.split()), done.output
    assert not (tmp_path / "t").exists()


def test_the_spend_a_deployment_search_reports_is_each_hospitals_largest_reported_epsilon(tmp_path):
    import json

    from medfed.simulation.tuning import reported_spend

    runs = []
    for number, rounds in enumerate([[{"a": 0.5, "b": 0.4}, {"a": 1.0, "b": None}], [{"a": 1.7}]]):
        run = tmp_path / f"trial-{number}"
        run.mkdir()
        lines = [{"round": r + 1, "sites": {site: ({"epsilon": eps} if eps is not None else {})
                                            for site, eps in sites.items()}} for r, sites in enumerate(rounds)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        runs.append(run)
    # the first run's summary: b's releases after the last round (calibration) took it to 0.6
    (runs[0] / "summary.json").write_text(json.dumps({"sites": {"a": {"epsilon": 1.1}, "b": {"epsilon": 0.6}}}))
    runs.append(tmp_path / "trial-never-started")  # a trial whose launch failed: no run directory

    assert reported_spend(runs) == {"a": 1.7, "b": 0.6}
