"""One ledger per site and task: a new version of the site's files never starts an empty ledger; an older ledger is
absorbed; a fresh ledger is an explicit, audited command; `medfed hospital budget` shows what was spent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client.dp_round import start_private_round
from medfed.client.gate import read_audit
from medfed.client.ledger import SKELLAM, LedgerEntry, PrivacyLedger, dataset_fingerprint, site_ledgers
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


def test_budget_rows_count_steps_and_clamp_what_remains(tmp_path):
    from medfed.client.privacy import budget_rows

    site = SiteConfig(site_id="st-marys", data_path="x.npz", n_classes=2, max_epsilon=0.5, max_delta=1e-6,
                      source=tmp_path / "site.yaml")
    PrivacyLedger(tmp_path / "state", "a" * 32).record([LedgerEntry.new(1, 1, 0.8, 0.2, 30),
                                                         LedgerEntry.new(1, 2, 0.8, 0.2, 12)])
    PrivacyLedger(tmp_path / "state", "b" * 32).path.parent.mkdir(parents=True, exist_ok=True)
    PrivacyLedger(tmp_path / "state", "b" * 32).record([])  # a ledger with nothing spent yet

    over, empty = budget_rows(site)

    assert (over["ledger"], over["rounds"], over["steps"], over["evaluations"]) == ("a" * 32, 2, 42, 0)
    assert over["spent"] == pytest.approx(epsilon_spent(PrivacyLedger(tmp_path / "state", "a" * 32).entries(), 1e-6))
    assert over["spent"] > 0.5 and over["remaining"] == 0.0  # over the cap: nothing remains, never a negative
    assert (over["cap"], over["delta"], over["evaluation_share"]) == (0.5, 1e-6, pytest.approx(0.0))
    assert (empty["spent"], empty["evaluation_share"], empty["remaining"], empty["steps"]) == (0.0, 0.0, 0.5, 0)


# --- the ledger file itself: each test below fails on a change to client/ledger.py that survived without it ------
def test_a_new_entry_keeps_every_field_it_is_given(monkeypatch):
    from medfed.client import ledger as ledger_module

    monkeypatch.setattr(ledger_module.time, "time", lambda: 1700000000.25)

    entry = LedgerEntry.new(7, 3, 1.5, 0.125, 40, "evaluate", period=2, batch_size=16, local_epochs=4)
    other = LedgerEntry.new(7, 3, 1.5, 0.125, 40)

    assert (entry.run_id, entry.server_round, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        7, 3, 1.5, 0.125, 40)
    assert (entry.recorded_at, entry.kind, entry.period, entry.batch_size, entry.local_epochs) == (
        1700000000.25, "evaluate", 2, 16, 4)
    assert (other.kind, other.period, other.batch_size, other.local_epochs) == ("train", 1, 0, 0)
    assert len(entry.id) == 32 and entry.id != other.id  # a fresh id each time


def test_a_ledger_creates_its_folders_writes_once_per_new_entry_and_reads_back_in_time_order(tmp_path):
    ledger = PrivacyLedger(tmp_path / "new" / "state", "k" * 32)  # no state directory yet
    late, early = LedgerEntry.new(1, 2, 1.0, 0.1, 5), LedgerEntry.new(1, 1, 1.0, 0.1, 5)
    early = LedgerEntry(**{**early.__dict__, "recorded_at": late.recorded_at - 10})

    recorded = ledger.record([late, early])
    written = (ledger.path.stat().st_ino, ledger.path.stat().st_mtime_ns)  # (a write replaces the file)
    again = ledger.record([early])  # nothing new: the file is not written again

    assert recorded == again == ledger.entries() == [early, late]
    assert (ledger.path.stat().st_ino, ledger.path.stat().st_mtime_ns) == written
    data = json.loads(ledger.path.read_text())
    assert data["version"] == 1 and data["dataset"] == "k" * 32 and len(data["entries"]) == 2
    assert ledger.record([]) == [early, late]


@pytest.mark.parametrize(("change", "error"), [
    ({"dataset": "x" * 32}, "ValueError"), ({"version": 2}, "ValueError"), ({"entries": [{"id": "only"}]}, "TypeError"),
    ({"entries": None}, "TypeError"), ("{half a json", "JSONDecodeError"),
])
def test_a_ledger_of_another_dataset_or_version_or_damaged_is_refused_not_read_as_empty(tmp_path, change, error):
    from medfed.common.errors import PrivacyBudgetExceeded

    ledger = PrivacyLedger(tmp_path, "k" * 32)
    ledger.record([LedgerEntry.new(1, 1, 1.0, 0.1, 5)])
    ledger.path.write_text(change if isinstance(change, str) else
                           json.dumps({**json.loads(ledger.path.read_text()), **change}))

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        ledger.entries()
    assert str(refused.value) == (
        f"This hospital's privacy ledger {'k' * 32}.json is unreadable ({error}); it refuses to train rather than "
        "forget what it spent. Restore the file from backup (it is in the site's state directory, privacy/).")


def test_the_ledger_the_node_mirrors_in_its_state_is_merged_back_into_the_file(tmp_path):
    from medfed.client.ledger import entries_from_state, entries_to_state

    spent = [LedgerEntry.new(5, 1, 1.1, 0.25, 40)]
    assert entries_from_state(entries_to_state(spent)) == spent
    assert entries_from_state(None) == entries_from_state("") == []
    # a node whose state remembers a round the site's file lost (a state directory restored from an older backup)
    state = _State()
    state.raw = entries_to_state(spent)
    cfg = compose_config(DP)
    env = NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {keys.RUN_STATE_DIR: str(tmp_path)})

    private = start_private_round(cfg, cfg.privacy, _site(), env, state, run_id=6, server_round=1)

    (ledger,) = site_ledgers(tmp_path)
    assert spent[0] in ledger.entries() and len(ledger.entries()) == 2
    assert private.plan.epsilon_after == pytest.approx(epsilon_spent(ledger.entries(), 1e-5), rel=1e-6)


def test_the_older_key_hashes_the_arrays_shapes_and_types_too_and_is_computed_once_per_site():
    from medfed.client import ledger as ledger_module

    site = _site()
    flat = SiteData("st-marys", train=ArrayDataset(site.train.images.reshape(64, 1, 4, 16).copy(), site.train.labels),
                    val=site.val, info=site.info)  # the same bytes in another shape
    assert dataset_fingerprint(flat) != dataset_fingerprint(site)
    first = dataset_fingerprint(site)
    assert len(first) == 32 and int(first, 16) >= 0

    site.train.images[0, 0, 0, 0] += 1.0  # (no caller changes a site's arrays; this shows the value is kept)

    assert dataset_fingerprint(site) == first
    assert id(site) in ledger_module._FINGERPRINTS
    key = id(site)
    del site
    import gc

    gc.collect()
    assert key not in ledger_module._FINGERPRINTS  # forgotten with its site


def test_a_reset_archives_under_its_time_needs_a_reason_and_an_existing_ledger(tmp_path, monkeypatch):
    from medfed.client import ledger as ledger_module
    from medfed.client.ledger import archive_ledger
    from medfed.common.errors import ConfigError

    key = "k" * 32
    for now in (1700000000.9, 1700000500.1):  # two resets: the archive folder exists the second time
        PrivacyLedger(tmp_path, key).record([LedgerEntry.new(1, 1, 1.0, 0.1, 5)])
        monkeypatch.setattr(ledger_module.time, "time", lambda now=now: now)
        target = archive_ledger(tmp_path, key, "new scanner")
        assert target == tmp_path / "privacy" / "archive" / f"{key}-{int(now)}.json" and target.is_file()
    assert not PrivacyLedger(tmp_path, key).path.exists()

    with pytest.raises(ConfigError, match=r"^a ledger reset needs a reason \(--reason TEXT\): it is written to "
                                          r"the audit log\.$"):
        archive_ledger(tmp_path, key, "  ")
    with pytest.raises(ConfigError, match=rf"^no privacy ledger {key} in this site's state directory; see `medfed "
                                          r"hospital budget`\.$"):
        archive_ledger(tmp_path, key, "new scanner")


def test_a_sites_ledger_key_is_the_same_in_every_medfed_version():
    # the key names the ledger file: were it to change, an upgraded hospital would start an empty ledger (a silent
    # budget reset). It is the sha256 of the site, dataset and class count as sorted JSON, written out here by hand.
    from medfed.client.ledger import ledger_key

    text = '{"classes": 2, "dataset": "site:st-marys", "site": "st-marys"}'
    assert ledger_key(_site()) == hashlib.sha256(text.encode()).hexdigest()[:32] == "98863d3f9320e939136a93e34f7b7387"
    other = SiteData("st-johns", train=_site().train, val=_site().val, info=DatasetInfo("site:st-marys", 2, 1, 2, 8,
                                                                                        ("0", "1")))
    assert ledger_key(other) != ledger_key(_site())


def test_the_ledgers_lock_excludes_every_other_holder_until_released_and_is_re_entrant(tmp_path):
    import fcntl

    ledger = PrivacyLedger(tmp_path, "k" * 32)

    def free() -> bool:  # what another process sees: a lock of its own on the same file
        with open(ledger.path.with_suffix(".lock"), "ab") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
            return True

    for _ in range(2):  # and again once released
        with ledger.locked():
            assert not free()
            with ledger.locked():  # the same object again: no deadlock
                assert not free()
            assert not free()  # the inner exit keeps the outer hold
            ledger.record([LedgerEntry.new(1, 1, 1.0, 0.1, 5)])  # record takes the lock too
        assert free()


def test_a_new_entry_is_gaussian_unless_told_and_keeps_the_skellam_fields_it_is_given(tmp_path):
    gaussian = LedgerEntry.new(3, 2, 1.5, 0.25, 4)
    skellam = LedgerEntry.new(3, 2, 6.0, 1.0, 1, mechanism=SKELLAM, l2=300.5, l1=4000.25)

    assert (gaussian.mechanism, gaussian.l2, gaussian.l1) == ("gaussian", 0.0, 0.0)
    assert (skellam.mechanism, skellam.l2, skellam.l1, skellam.noise_multiplier) == (SKELLAM, 300.5, 4000.25, 6.0)
    ledger = PrivacyLedger(tmp_path, "k")
    ledger.record([gaussian, skellam])
    written = {e["id"]: e for e in json.loads(ledger.path.read_text())["entries"]}
    assert written[gaussian.id]["mechanism"] == "gaussian" and written[skellam.id]["mechanism"] == "skellam"
    assert sorted(e.id for e in ledger.entries()) == sorted([gaussian.id, skellam.id])
