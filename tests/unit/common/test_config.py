"""Config composition and validation: typos and bad values fail before anything starts."""

from __future__ import annotations

import pytest

from medfed.common.config import (
    Config,
    MedMNISTConfig,
    SyntheticConfig,
    compose_config,
    config_to_yaml,
    overrides_from_run_config,
    run_config_from_overrides,
)
from medfed.common.errors import ConfigError


def test_defaults_compose_to_typed_config():
    # Execute
    cfg = compose_config([])

    # Assert
    assert isinstance(cfg, Config)
    assert isinstance(cfg.dataset, SyntheticConfig)
    assert cfg.strategy.name == "fedavg"
    assert cfg.privacy.name == "none"


def test_repeated_compositions_are_independent_copies():
    # Prepare
    first = compose_config(["train.rounds=7"])

    # Execute
    first.train.rounds = 99
    second = compose_config(["train.rounds=7"])

    # Assert
    assert second.train.rounds == 7
    assert second is not first


def test_a_bad_value_fails_every_time_it_is_composed():
    for _ in range(2):
        with pytest.raises(ConfigError, match="train.rounds"):
            compose_config(["train.rounds=0"])


def test_group_option_switches_schema_and_overrides_apply():
    # Execute
    cfg = compose_config(
        ["dataset=medmnist", "dataset.name=breastmnist", "federation.hospitals=5", "train.rounds=7", "train.lr=0.01"]
    )

    # Assert
    assert isinstance(cfg.dataset, MedMNISTConfig)
    assert cfg.dataset.name == "breastmnist"
    assert (cfg.federation.hospitals, cfg.train.rounds, cfg.train.lr) == (5, 7, 0.01)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["dataset=foo"], r"dataset='foo' is not a known dataset option; choose one of: folder, medmnist, synthetic"),
        (["model=bogus"], r"model='bogus' is not a known model option; choose one of: densenet121, resnet18, scatternet, smallcnn"),
        (["federation.partition=bogus"], r"federation.partition='bogus' is not allowed; choose one of: iid, dirichlet, quantity"),
        (["train.optimizer=lbfgs"], r"train.optimizer='lbfgs' is not allowed; choose one of: adamw, adam, sgd"),
        (["privacy=dp", "privacy.accountant=pld"], r"privacy.accountant='pld' is not allowed; choose one of: rdp"),
        (["train.lr=-1"], r"train.lr=-1.0 is out of range"),
        (["train.rounds=0"], r"train.rounds=0 is out of range"),
        (["train.rounds=abc"], r"train.rounds"),
        (["federation.val_fraction=1.5"], r"federation.val_fraction=1.5 is out of range"),
        (["federation.alpha=0"], r"federation.alpha=0.0 is out of range"),
        (["strategy.round_timeout_s=0"], r"strategy.round_timeout_s=0.0 is out of range; it must be > 0 seconds"),
        (["train.foo=1"], r"train.foo"),
        (["dataset.data_path=/x"], r"dataset.data_path"),  # synthetic has no data path: a typo-proof schema
        (["dataset=medmnist", "dataset.size=30"], r"dataset.size=30 is not allowed; choose one of: 28, 64, 128, 224"),
        (["federation.hospitals=1"], r"strategy.min_train_nodes=2 exceeds federation.hospitals=1"),
        (["train.rounds"], r"not of the form key=value"),
        (["model.norm=layer"], r"model.norm='layer' is not allowed; choose one of: group, batch"),
        (["model.norm=batch", "privacy=dp"], r"model.norm=batch cannot run with privacy=dp: .*model.norm=group"),
        (["model.norm=batch", "privacy=central_dp"], r"model.norm=batch cannot run with privacy=central_dp"),
        (["model.norm=batch", "privacy.secure_aggregation=true"],
         r"model.norm=batch cannot run with privacy.secure_aggregation=true: SecAgg\+ quantises"),
    ],
)
def test_bad_values_name_key_value_and_choices(overrides, match):
    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)


def test_run_config_round_trip_carries_the_same_config():
    # Prepare
    overrides = ["dataset=medmnist", "dataset.name=breastmnist", "train.rounds=3"]

    # Execute
    run_config = run_config_from_overrides(overrides, **{"run-dir": "/tmp/x"})
    again = overrides_from_run_config(run_config)

    # Assert
    assert again == overrides
    assert config_to_yaml(compose_config(again)) == config_to_yaml(compose_config(overrides))


def test_run_config_with_garbage_is_a_config_error():
    with pytest.raises(ConfigError, match="JSON list"):
        overrides_from_run_config({"medfed-overrides": "not json"})


def test_resolved_yaml_lists_every_group():
    # Execute
    text = config_to_yaml(compose_config([]))

    # Assert
    for group in ("dataset:", "model:", "strategy:", "federation:", "train:", "privacy:"):
        assert group in text


@pytest.mark.parametrize(
    "overrides", [[], ["dataset=medmnist", "dataset.name=breastmnist", "train.augment.enabled=true", "train.lr=0.02"]]
)
def test_dict_round_trip_rebuilds_the_same_config(overrides):
    from medfed.common.config import config_from_dict, config_to_dict

    cfg = compose_config(overrides)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_dict_round_trip_still_validates():
    from medfed.common.config import config_from_dict, config_to_dict

    data = config_to_dict(compose_config([]))
    data["train"]["lr"] = -1.0
    with pytest.raises(ConfigError, match="train.lr=-1.0 is out of range"):
        config_from_dict(data)


def test_round_learning_rate_schedules():
    # Prepare
    constant = compose_config(["train.rounds=3", "train.lr=0.001"]).train
    cosine = compose_config(["train.rounds=3", "train.lr=0.001", "train.lr_schedule=cosine", "train.lr_min_factor=0.1"]).train

    # Assert (by hand: low = 1e-4; middle = low + (lr - low) / 2)
    assert [constant.round_lr(r) for r in (1, 2, 3)] == [0.001, 0.001, 0.001]
    assert cosine.round_lr(1) == pytest.approx(1e-3)
    assert cosine.round_lr(2) == pytest.approx(5.5e-4)
    assert cosine.round_lr(3) == pytest.approx(1e-4)
    assert cosine.round_lr(9) == pytest.approx(1e-4)  # resumed or extra rounds stay at the floor


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["dataset=folder", "dataset.data_paths=[a,b]"], r"dataset.classes=\[\] must name at least 2 labels"),
        (["dataset=folder", "dataset.classes=[x,y]"], r"dataset.data_paths is empty"),
        (["dataset=folder", "dataset.classes=[x,y]", "dataset.data_paths=[a,b]", "federation.hospitals=3"],
         r"dataset.data_paths has 2 folders but federation.hospitals=3"),
        (["dataset=folder", "dataset.classes=[x,y]", "dataset.data_paths=[a,b]", "dataset.labels=[m.csv]",
          "federation.hospitals=2"], r"dataset.labels has 1 entries for 2 dataset.data_paths"),
    ],
)
def test_folder_dataset_options_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)


def test_every_group_option_has_a_registered_schema_and_back():
    from medfed.common.config.registry import GROUPS, group_options

    for name, group in GROUPS.items():
        assert sorted(group.options) == group_options(name), name


def test_dict_round_trip_finds_the_schema_by_name():
    from medfed.common.config import KrumConfig, config_from_dict, config_to_dict

    # Prepare: multikrum shares KrumConfig with krum; fedmedian has the base schema
    data = config_to_dict(compose_config(["strategy=multikrum"]))

    # Execute
    cfg = config_from_dict(data)

    # Assert
    assert isinstance(cfg.strategy, KrumConfig)
    assert cfg.strategy.num_nodes_to_select == 2


def test_dict_with_an_unknown_strategy_name_lists_the_choices():
    from medfed.common.config import config_from_dict, config_to_dict

    data = config_to_dict(compose_config([]))
    data["strategy"]["name"] = "fedsgd"
    with pytest.raises(ConfigError, match=r"strategy.name='fedsgd' is not a known strategy; choose one of: fedadagrad, "):
        config_from_dict(data)


def test_choices_are_typed_and_serialise_as_plain_strings():
    from medfed.common.config import config_to_dict
    from medfed.common.config.choices import OPTIMIZERS, Optimizer, Partition

    # Execute
    cfg = compose_config(["train.optimizer=sgd"])
    data = config_to_dict(cfg)

    # Assert: a member in the config, equal to its string; a plain string in the dict
    assert cfg.train.optimizer is Optimizer.sgd and cfg.train.optimizer == "sgd"
    assert cfg.federation.partition == Partition.iid == "iid"
    assert type(data["train"]["optimizer"]) is str and type(data["federation"]["partition"]) is str
    assert OPTIMIZERS == ("adamw", "adam", "sgd")


def test_every_rule_is_registered():
    import inspect

    from medfed.common.config import rules

    defined = {f for name, f in inspect.getmembers(rules, inspect.isfunction)
               if f.__module__ == rules.__name__ and not name.startswith("_") and name != "check_rules"}
    assert defined == set(rules.RULES)


@pytest.mark.parametrize(
    ("old", "new", "field", "value"),
    [
        ("dataset.root=/data/medmnist", "dataset.data_path", "data_path", "/data/medmnist"),
        ("dataset.roots=[a,b]", "dataset.data_paths", "data_paths", ["a", "b"]),
        ("dataset.test_root=t", "dataset.test_data_path", "test_data_path", "t"),
    ],
)
def test_renamed_data_path_keys_still_compose_with_a_deprecation_warning(old, new, field, value):
    from medfed.common.config import compose_config

    group = "dataset=medmnist" if field == "data_path" else "dataset=folder"
    extra = [] if field == "data_path" else ["dataset.classes=[x,y]", "federation.hospitals=2",
                                              *([] if field == "data_paths" else ["dataset.data_paths=[a,b]"])]
    with pytest.warns(FutureWarning, match=f"{old.split('=')[0]} is deprecated.*it is now {new}"):
        cfg = compose_config([group, old, *extra])
    assert getattr(cfg.dataset, field) == value


@pytest.mark.parametrize(("overrides", "deployment", "warned"), [
    (["strategy=krum", "federation.partition=dirichlet", "federation.hospitals=5"], False, True),
    (["strategy=krum", "federation.partition=iid", "federation.hospitals=5"], False, False),  # alike data: its use
    (["strategy=multikrum", "strategy.num_nodes_to_select=3", "federation.partition=dirichlet",
      "federation.hospitals=5"], False, False),  # keeps most of the round
    (["strategy=multikrum", "strategy.num_nodes_to_select=2", "federation.partition=quantity",
      "federation.hospitals=5"], False, True),
    (["strategy=krum", "strategy.min_train_nodes=3"], True, True),  # deployment: real data are rarely alike
    (["strategy=fedmedian", "federation.partition=dirichlet"], False, False),
])
def test_krum_under_label_skew_is_warned_about_with_the_measured_reason_and_what_to_use(overrides, deployment,
                                                                                        warned):
    from medfed.common.config.advice import advisories

    advice = advisories(compose_config(overrides), deployment=deployment)

    assert bool(advice) == warned
    if warned:
        assert "fedmedian" in advice[0] and "0.415" in advice[0] and "label" in advice[0]
