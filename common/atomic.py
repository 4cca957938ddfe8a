"""Atomic file writes: write to a temp file beside the target, sync it, then rename over the target.

A reader (another process, or a resumed run after a crash) never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: Path, *, binary: bool = True, mode: int = 0o600) -> Iterator[IO[Any]]:
    """Yield a handle to write ``path``'s new content; on success it replaces ``path`` in one rename.

    The file has permission bits ``mode`` from its creation (the temp file is made 0600, then set to ``mode``
    before anything is written). On any exception the temp file is removed and ``path`` keeps its old content
    (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
