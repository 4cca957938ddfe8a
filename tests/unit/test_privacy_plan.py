"""`medfed privacy plan`: every simulated hospital's DP plan for a config, the same plan the site makes when its
first round comes, nothing recorded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client.dp_round import start_private_round
from medfed.client.node import NodeEnv
from medfed.client.site import resolve_site
from medfed.common import keys
from medfed.common.config import compose_config

RECIPE = ["privacy=dp", "privacy.target_epsilon=8", "federation.hospitals=3", "train.rounds=3",
          "dataset.n_train=240", "dataset.n_test=60", "federation.site_max_epsilon_each=[0.5,8,8]"]


class _State:  # a node's state between messages, empty
    def __init__(self) -> None:
        self.raw: str | None = None

    def ledger_entries(self) -> str | None:
        return self.raw

    def set_ledger_entries(self, raw: str) -> None:
        self.raw = raw


def test_the_plan_is_the_one_each_site_makes_and_records_nothing(tmp_path):
    args = ["privacy", "plan", *RECIPE, "--cache-dir", str(tmp_path / "cache"), "--state-dir",
            str(tmp_path / "state"), "--json"]

    shown = CliRunner().invoke(cli, args)

    assert shown.exit_code == 0, shown.output
    capped, *others = json.loads(shown.output)
    # hospital-0's own cap (0.5) is far below the run's target: it plans a run that fits it, evaluations included
    assert capped["refusal"] is None and capped["epsilon_after_run"] <= 0.5 + 1e-6
    assert capped["noise_multiplier"] > others[0]["noise_multiplier"] and capped["release_noise"] > 1
    for plan in others:  # the whole run, its evaluations included, within the run's target
        assert plan["refusal"] is None and 0 < plan["epsilon_after_run"] <= 8.0 + 1e-6
        assert plan["release_noise"] > 1 and plan["releases"] == 3 + 2 + 1
    assert not (tmp_path / "state" / "privacy").exists() or not list((tmp_path / "state" / "privacy").glob("*.json"))
    # the site, planning its first round for real, picks the same noise
    cfg = compose_config(RECIPE)
    env = NodeEnv.resolve({keys.NODE_PARTITION_ID: 1}, {keys.RUN_CACHE_DIR: str(tmp_path / "cache"),
                                                        keys.RUN_STATE_DIR: str(tmp_path / "real")})
    real = start_private_round(cfg, cfg.privacy, resolve_site(cfg, env), env, _State(), run_id=1, server_round=1)
    assert real.plan.noise_multiplier == pytest.approx(others[0]["noise_multiplier"])
    assert real.plan.steps == others[0]["steps_per_round"]


def test_a_site_whose_cap_fits_not_even_one_step_refuses_in_the_plan(tmp_path):
    recipe = [*RECIPE[:-1], "federation.site_max_epsilon_each=[0.001,8,8]"]
    shown = CliRunner().invoke(cli, ["privacy", "plan", *recipe, "--cache-dir", str(tmp_path / "cache"),
                                     "--state-dir", str(tmp_path / "state"), "--json"])

    capped, *others = json.loads(shown.output)
    assert "Privacy cap reached" in capped["refusal"] and "even one full-batch step" in capped["refusal"]
    assert capped["noise_multiplier"] is None and all(p["refusal"] is None for p in others)


@pytest.mark.parametrize("privacy", [[], ["privacy=distributed_dp"]])
def test_a_plan_without_dp_is_refused_with_the_fix(privacy):
    shown = CliRunner().invoke(cli, ["privacy", "plan", "federation.hospitals=2", *privacy])

    assert shown.exit_code != 0
    text = " ".join(shown.output.split())  # the console wraps long lines
    assert "shows each hospital's privacy=dp plan" in text and "Add privacy=dp to the overrides" in text
