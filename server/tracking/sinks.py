"""Where a run's records go: each round's line of ``metrics.jsonl``, ``summary.json`` at the end, TensorBoard
events, and any other :class:`RoundSink` a caller adds (a console display, say)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

from medfed.server.runs import RunDirectory

__all__ = ["MetricsLines", "RoundSink", "SummaryFile", "TensorBoardEvents"]

logger = logging.getLogger(__name__)


class RoundSink(Protocol):
    """Receives every round's record (the metrics line) and the run's summary; closed once at the end."""

    def on_round(self, record: Mapping[str, Any]) -> None: ...

    def on_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLines:
    """Appends each round's record to ``RUN_DIR/metrics.jsonl`` (strict JSON, flushed to disk)."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_round(self, record: Mapping[str, Any]) -> None:
        self.run_dir.append_metrics(record)

    def on_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class SummaryFile:
    """Writes ``RUN_DIR/summary.json`` at the end of the run."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_round(self, record: Mapping[str, Any]) -> None:
        pass

    def on_summary(self, summary: Mapping[str, Any]) -> None:
        self.run_dir.write_summary(summary)

    def close(self) -> None:
        pass


class TensorBoardEvents:
    """The rounds' scalars as TensorBoard events in ``RUN_DIR/tensorboard`` (global, per site, privacy)."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self._writer: Any = None

    def on_round(self, record: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = int(record["round"])
        if self._writer is None:  # a resumed run drops events after its checkpoint
            self._writer = SummaryWriter(log_dir=str(self.run_dir.path / "tensorboard"), purge_step=step)
        scalars: dict[str, Any] = {"train/loss": record["train"]["loss"]}
        scalars.update({f"val/{k}": v for k, v in record["val"].items()})
        scalars.update({f"test/{k}": v for k, v in (record.get("test") or {}).items()})
        for site_id, site in record["sites"].items():
            scalars.update({f"site/{site_id}/val_{k}": site["val"].get(k) for k in ("auc", "acc", "ece")})
            scalars[f"site/{site_id}/epsilon"] = site.get("epsilon")
        scalars.update({f"privacy/{k}": v for k, v in (record.get("privacy") or {}).items()})
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def on_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Close the writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
