"""The coordinator's SuperLink process: Flower's, its SQLite state waiting a minute for a lock (not 5 s)."""

from __future__ import annotations

import logging
import sqlite3
import sys

import pytest
from flwr.supercore import sql_mixin

from medfed.server.coordinator import Coordinator
from medfed.server.superlink import BUSY_TIMEOUT_MS, wait_longer_for_locks


@pytest.fixture
def flower_pragmas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's pragmas as they are, put back after the test (the patch changes a module global)."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)


def test_every_connection_flower_opens_waits_a_minute_for_a_lock(tmp_path, flower_pragmas):
    # Prepare: Flower's own setting (5 s: HTTP 500 "database is locked" under load)
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "5000"

    # Execute: the patch, then a connection set up by Flower's own hook
    patched = wait_longer_for_locks()
    connection = sqlite3.connect(tmp_path / "state.db")
    sql_mixin._set_sqlite_pragmas(connection, None)

    # Assert: the lock timeout is a minute; Flower's other pragmas are untouched
    assert patched
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS == 60_000
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_a_flower_without_the_pragma_keeps_its_own_timeout_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (("journal_mode", "WAL"),))

    with caplog.at_level(logging.WARNING, logger="medfed.server.superlink"):
        patched = wait_longer_for_locks()

    assert not patched and sql_mixin.SQLITE_PRAGMAS == (("journal_mode", "WAL"),)
    assert "keeps Flower's own lock timeout" in caplog.text


def test_the_coordinator_starts_the_superlink_through_medfeds_wrapper(tmp_path):
    command = Coordinator(tmp_path / "coord", address="127.0.0.1:9093", insecure=True).superlink_command()

    assert command[:3] == [sys.executable, "-m", "medfed.server.superlink"]
