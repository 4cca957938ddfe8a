"""One ledger per site and task: a new version of the site's files never starts an empty ledger; an older ledger is
absorbed; a fresh ledger is an explicit, audited command; `medfed hospital budget` shows what was spent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client.dp_round import start_private_round
from medfed.client.gate import read_audit
from medfed.client.ledger import LedgerEntry, PrivacyLedger, dataset_fingerprint, site_ledgers
from medfed.client.node import NodeEnv
from medfed.client.privacy import epsilon_spent
from medfed.client.site import SiteConfig, write_site_config
from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.data import ArrayDataset, DatasetInfo, SiteData

DP = ["privacy=dp", "privacy.target_epsilon=4", "train.rounds=2", "train.batch_size=16"]


class _State:
    def __init__(self) -> None:
        self.raw: str | None = None
        self.keys: list[str] = []

    def ledger_entries(self) -> str | None:
        return self.raw

    def set_ledger_entries(self, raw: str) -> None:
        self.raw = raw

    def kept_layers(self) -> None:
        return None

    def set_kept_layers(self, kept: object) -> None:
        pass

    def answered(self) -> list[str]:
        return self.keys

    def set_answered(self, answered: list[str]) -> None:
        self.keys = answered


def _site(n: int = 64, order: np.ndarray | None = None) -> SiteData:
    rng = np.random.default_rng(0)
    images, labels = rng.random((n, 1, 8, 8)).astype(np.float32), np.arange(n) % 2
    if order is not None:
        images, labels = images[order], labels[order]
    data = ArrayDataset(images, labels)
    return SiteData("st-marys", train=data, val=data, info=DatasetInfo("site:st-marys", 2, 1, 2, 8, ("0", "1")))


def _plan(site: SiteData, state_dir: Path, run_id: int) -> float:
    cfg = compose_config(DP)
    env = NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {keys.RUN_STATE_DIR: str(state_dir)})
    private = start_private_round(cfg, cfg.privacy, site, env, _State(), run_id=run_id, server_round=1)
    return private.plan.epsilon_after


@pytest.mark.parametrize(
    "changed",
    [
        _site(64, order=np.arange(64)[::-1]),  # the same images in another order
        _site(65),  # one image more
        _site(48),  # another split (fewer training images)
    ],
)
def test_a_new_version_of_the_sites_files_keeps_its_ledger(tmp_path, changed):
    # Prepare: one DP round on the site's data
    first = _plan(_site(), tmp_path, run_id=1)

    # Execute: the next run trains on a changed version of the files
    second = _plan(changed, tmp_path, run_id=2)

    # Assert: one ledger, and the second run's epsilon composes with the first's
    assert dataset_fingerprint(changed) != dataset_fingerprint(_site())
    assert len(site_ledgers(tmp_path)) == 1
    assert second > first


def test_a_ledger_kept_under_the_older_key_is_absorbed(tmp_path):
    # Prepare: a ledger written by an earlier medfed, keyed by the training split's bytes
    site = _site()
    older = PrivacyLedger(tmp_path, dataset_fingerprint(site))
    spent = [LedgerEntry.new(7, 1, 1.1, 0.25, 40)]
    older.record(spent)

    # Execute
    after = _plan(site, tmp_path, run_id=8)

    # Assert: the site's ledger holds the older entries, and its epsilon counts them
    (ledger,) = site_ledgers(tmp_path)  # the older file is archived, not listed twice
    assert ledger.fingerprint != older.fingerprint and not older.path.exists()
    assert (tmp_path / "privacy" / "archive" / f"{older.fingerprint}-absorbed.json").is_file()
    entries = ledger.entries()
    assert spent[0] in entries and len(entries) == 2
    assert after == pytest.approx(epsilon_spent(entries, 1e-5), rel=1e-6)


def test_budget_shows_what_was_spent_and_a_reset_is_explicit_and_audited(tmp_path):
    # Prepare: a deployed site that trained one DP round
    write_site_config(SiteConfig(site_id="st-marys", data_path="x.npz", n_classes=2, max_epsilon=10.0),
                      tmp_path / "site.yaml")
    spent = _plan(_site(), tmp_path / "state", run_id=1)
    runner = CliRunner()

    # Execute / Assert: the budget
    shown = runner.invoke(cli, ["hospital", "budget", "--config", str(tmp_path / "site.yaml"), "--json"])
    assert shown.exit_code == 0, shown.output
    (row,) = json.loads(shown.output)
    assert row["spent"] == pytest.approx(spent, rel=1e-6) and row["remaining"] == pytest.approx(10.0 - spent)

    # a reset without a reason is refused; with one, the ledger is archived and the reset audited
    refused = runner.invoke(cli, ["hospital", "budget", "--config", str(tmp_path / "site.yaml"), "reset",
                                  "--reason", " "])
    assert refused.exit_code != 0 and "needs a reason" in refused.output
    done = runner.invoke(cli, ["hospital", "budget", "--config", str(tmp_path / "site.yaml"), "reset",
                               "--reason", "new scanner data set"])
    assert done.exit_code == 0, done.output
    assert site_ledgers(tmp_path / "state") == []
    assert len(list((tmp_path / "state" / "privacy" / "archive").glob("*.json"))) == 1
    (entry,) = [e for e in read_audit(tmp_path / "state") if e["event"] == "ledger-reset"]
    assert entry["reason"] == "new scanner data set" and entry["spent"] == pytest.approx(spent, rel=1e-6)


def test_budget_shows_how_much_of_the_spend_the_noised_evaluations_add(tmp_path):
    write_site_config(SiteConfig(site_id="st-marys", data_path="x.npz", n_classes=2, max_epsilon=10.0),
                      tmp_path / "site.yaml")
    ledger = PrivacyLedger(tmp_path / "state", "k" * 32)
    ledger.record([LedgerEntry.new(1, 1, 1.0, 0.1, 30), LedgerEntry.new(1, 1, 6.0, 1.0, 1, "evaluate"),
                   LedgerEntry.new(1, 2, 6.0, 1.0, 1, "evaluate")])

    shown = CliRunner().invoke(cli, ["hospital", "budget", "--config", str(tmp_path / "site.yaml"), "--json"])

    assert shown.exit_code == 0, shown.output
    (row,) = json.loads(shown.output)
    training_alone = epsilon_spent([e for e in ledger.entries() if e.kind == "train"], 1e-5)
    assert row["rounds"] == 1 and row["evaluations"] == 2
    assert row["spent"] > training_alone
    assert row["evaluation_share"] == pytest.approx(1 - training_alone / row["spent"])
