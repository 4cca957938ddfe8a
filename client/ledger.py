"""A hospital's privacy ledger: every DP round trained on its data, on its own disk, locked across processes.

One ledger per site and task (:func:`ledger_key`: the site id and the dataset it trains on), not per exact bytes of
the data: reordering rows, adding an image or another validation split never starts an empty ledger. A ledger
written under the older key (a digest of the training split's bytes, :func:`dataset_fingerprint`) is absorbed into
the site's ledger the first time it is found. Starting a fresh ledger is an explicit, audited operator command
(``medfed hospital budget reset --reason ...``), which archives the old file. The ledger is mirrored in Flower's
``context.state``; epsilon is computed from it by :func:`medfed.client.privacy.epsilon_spent`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from medfed.common.atomic import atomic_write
from medfed.common.data import SiteData
from medfed.common.data.image_files import iter_chunks
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded

__all__ = [
    "LEDGER_VERSION",
    "SKELLAM",
    "LedgerEntry",
    "PrivacyLedger",
    "absorb_older",
    "archive_ledger",
    "dataset_fingerprint",
    "entries_from_state",
    "entries_to_state",
    "ledger_key",
    "site_ledgers",
]

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
SKELLAM = "skellam"  # the mechanism of a distributed-DP round's entry (LedgerEntry.mechanism)


def ledger_key(site: SiteData) -> str:
    """The ledger of a site and task: its site id and the dataset it trains on (never the data's bytes)."""
    text = json.dumps({"site": site.site_id, "dataset": site.info.name, "classes": site.info.n_classes},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# fingerprints of the SiteData objects alive in this process (an entry goes when its object is collected, so this
# never keeps site data in memory that the site cache has let go)
_FINGERPRINTS: dict[int, str] = {}


def dataset_fingerprint(site: SiteData) -> str:
    """A digest of the site's training images and labels: the older ledger key, read to absorb a ledger written
    under it (it never leaves the site)."""
    cached = _FINGERPRINTS.get(id(site))
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for array in (site.train.images, site.train.labels):
        digest.update(str((array.dtype.str, array.shape)).encode())
        for chunk in iter_chunks(array):  # (a chunk at a time: the images may be on disk)
            digest.update(chunk.tobytes())
    value = digest.hexdigest()[:32]
    _FINGERPRINTS[id(site)] = value
    weakref.finalize(site, _FINGERPRINTS.pop, id(site), None)  # pragma: no mutate (the entry is always there)
    return value


@dataclass(frozen=True)
class LedgerEntry:
    """One DP release at this site (a round of DP-SGD, or a noised evaluation: ``kind``): what the accountant
    needs, and where it came from. A noised evaluation is one Gaussian step at sampling rate 1."""

    id: str
    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: float
    kind: str = "train"  # train | evaluate | calibrate | reliability (older ledgers: every entry is training)
    # a training entry's run plan (medfed.client.privacy.plan_round): the batch size and local epochs it trains
    # with (0: not recorded, older ledgers), and the period: the site trains every period-th round of the run (a
    # small site whose cap allows fewer steps sits the others out)
    period: int = 1
    batch_size: int = 0
    local_epochs: int = 0
    # the noise: "gaussian" (DP-SGD, noised releases), or "skellam" (a distributed-DP round: integer noise of
    # standard deviation noise_multiplier * l2 in the sum, with one image's L2 and L1 sensitivities l2 and l1)
    mechanism: str = "gaussian"
    l2: float = 0.0
    l1: float = 0.0

    @staticmethod
    def new(
        run_id: int, server_round: int, noise_multiplier: float, sample_rate: float, steps: int, kind: str = "train",
        period: int = 1, batch_size: int = 0, local_epochs: int = 0, mechanism: str = "gaussian", l2: float = 0.0,
        l1: float = 0.0,
    ) -> LedgerEntry:
        return LedgerEntry(uuid.uuid4().hex, run_id, server_round, noise_multiplier, sample_rate, steps, time.time(),
                           kind, period, batch_size, local_epochs, mechanism, l2, l1)


class PrivacyLedger:
    """The on-disk ledger of one site's data: ``STATE_DIR/privacy/<fingerprint>.json``, written atomically.

    A ledger that exists but cannot be read is never treated as empty: the site refuses to train until it is
    restored (an empty ledger would silently reset the budget).
    """

    def __init__(self, state_dir: Path, fingerprint: str) -> None:
        self.path = Path(state_dir).expanduser() / "privacy" / f"{fingerprint}.json"
        self.fingerprint = fingerprint
        self._lock_file: IO[bytes] | None = None  # open while this object holds the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on this ledger across processes (``fcntl.flock`` on ``<ledger>.lock``), held from
        reading what was spent through planning to recording the new round, so two runs or two processes never
        both pass a cap that only one of them fits under. Re-entrant within one ledger object."""
        if self._lock_file is not None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            self._lock_file = handle
            try:
                yield
            finally:
                self._lock_file = None
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[LedgerEntry]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_bytes())
            if data.get("version") != LEDGER_VERSION or data.get("dataset") != self.fingerprint:
                raise ValueError  # another version's or dataset's ledger (only the type name is reported)
            return [LedgerEntry(**entry) for entry in data["entries"]]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise PrivacyBudgetExceeded(
                f"This hospital's privacy ledger {self.path.name} is unreadable ({type(exc).__name__}); it refuses "
                "to train rather than forget what it spent. Restore the file from backup (it is in the site's "
                "state directory, privacy/)."
            ) from None

    def record(self, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
        """Add entries (kept once by id) and write the ledger, under its lock; returns every entry now on disk."""
        with self.locked():
            return self._record(entries)

    def _record(self, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
        merged = {e.id: e for e in self.entries()}
        known = len(merged)
        for entry in entries:
            merged.setdefault(entry.id, entry)
        ordered = sorted(merged.values(), key=lambda e: (e.recorded_at, e.id))
        if len(merged) == known and self.path.is_file():
            return ordered
        payload = {"version": LEDGER_VERSION, "dataset": self.fingerprint, "entries": [asdict(e) for e in ordered]}
        text = json.dumps(payload, indent=1)  # pragma: no mutate (the layout is for a person reading the file)
        with atomic_write(self.path) as handle:  # (under the lock, which made the folder)
            handle.write(text.encode())
        return ordered


def entries_from_state(raw: str | None) -> list[LedgerEntry]:
    """Ledger entries kept in ``context.state`` (a JSON list)."""
    return [LedgerEntry(**entry) for entry in json.loads(raw)] if raw else []


def entries_to_state(entries: Iterable[LedgerEntry]) -> str:
    return json.dumps([asdict(e) for e in entries])


def _archive(ledger: PrivacyLedger, label: str) -> Path:
    """Move a ledger's file to ``privacy/archive/<key>-<label>.json`` (never deleted); returns where."""
    target = ledger.path.parent / "archive" / f"{ledger.fingerprint}-{label}.json"
    target.parent.mkdir(exist_ok=True)  # in privacy/, which holds the ledger
    ledger.path.rename(target)
    return target


def absorb_older(ledger: PrivacyLedger, older: PrivacyLedger) -> list[LedgerEntry]:
    """Absorb a ledger kept under another key (the older byte key) into ``ledger``: its entries are recorded there
    and its file moves to the archive. Returns the entries absorbed (none when there is no such file)."""
    if not older.path.is_file():
        return []
    absorbed = older.entries()
    ledger.record(absorbed)
    _archive(older, "absorbed")
    return absorbed


def site_ledgers(state_dir: Path) -> list[PrivacyLedger]:
    """Every ledger in a site's state directory (archived ones aside)."""
    folder = Path(state_dir).expanduser() / "privacy"
    return [PrivacyLedger(state_dir, path.stem) for path in sorted(folder.glob("*.json"))]


def archive_ledger(state_dir: Path, key: str, reason: str) -> Path:
    """Start a fresh ledger for ``key``: the old file moves to ``privacy/archive/`` (never deleted); returns where.

    Raises:
        ConfigError: no reason given, or no ledger under ``key``.
    """
    if not reason.strip():
        raise ConfigError("a ledger reset needs a reason (--reason TEXT): it is written to the audit log.")
    ledger = PrivacyLedger(state_dir, key)
    with ledger.locked():
        if not ledger.path.is_file():
            raise ConfigError(f"no privacy ledger {key} in this site's state directory; see `medfed hospital budget`.")
        target = _archive(ledger, str(int(time.time())))
    logger.warning("privacy ledger %s archived to %s: %s", key, target, reason)
    return target
