"""The coordinator's SuperLink process: Flower's ``flower-superlink``, its SQLite state waiting longer for a lock.

``python -m medfed.server.superlink ARGS...`` runs Flower's SuperLink with Flower's own arguments
(:meth:`medfed.server.coordinator.Coordinator.superlink_command` builds them). The one change: Flower's SQLite state
gives up on a lock after 5 s (``PRAGMA busy_timeout``) and answers the request with HTTP 500 ("database is
locked"); here it waits up to :data:`BUSY_TIMEOUT_MS`. Measured with benchmarks/load.py (20 hospital daemons and the
coordinator on one busy 2-core machine): hospitals' replies failed to upload and their rounds went on without them,
below the rounds' minimum, and the SuperLink's own SuperExec exited on such an answer, leaving the run's ServerApp
without a parent. A lock that is slow to come is a slow answer, never a lost one.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["BUSY_TIMEOUT_MS", "main", "wait_longer_for_locks"]

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 60_000


def wait_longer_for_locks(milliseconds: int = BUSY_TIMEOUT_MS) -> bool:
    """Make every SQLite connection Flower's SuperLink opens from now on wait up to ``milliseconds`` for a lock;
    False (Flower's own timeout stays, with a warning) when this Flower sets no ``busy_timeout`` to replace."""
    from flwr.supercore import sql_mixin

    pragmas: tuple[tuple[str, str], ...] = tuple(getattr(sql_mixin, "SQLITE_PRAGMAS", ()))
    if not any(name == "busy_timeout" for name, _ in pragmas):
        logger.warning("this Flower sets no SQLite busy_timeout where medfed expects it (flwr.supercore.sql_mixin."
                       "SQLITE_PRAGMAS); the SuperLink keeps Flower's own lock timeout")
        return False
    # (a module global that Flower's connect hook reads at every new connection)
    setattr(sql_mixin, "SQLITE_PRAGMAS", tuple((name, str(milliseconds) if name == "busy_timeout" else value)
                                               for name, value in pragmas))
    return True


def main() -> None:
    """Entry point: Flower's ``flower-superlink`` with the longer lock timeout."""
    wait_longer_for_locks()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
