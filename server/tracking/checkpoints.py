"""The weights a run keeps: the best round's model, the latest round's checkpoint (weights, tracker state and the
strategy's state, for an exact ``--resume``), the last rounds' snapshots (snapshot ensemble), the final model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.server.runs import RunDirectory

__all__ = ["Checkpoints"]

logger = logging.getLogger(__name__)


class Checkpoints:
    """Writes one run's weight files (``best_model.pt``, ``checkpoints/``, ``model.pt``) into its run directory."""

    def __init__(self, run_dir: RunDirectory, *, snapshots: int = 0) -> None:
        self.run_dir = run_dir
        self.snapshots = snapshots  # keep the global models of this many latest rounds (snapshot ensemble)

    def save_best(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """The weights of the round selection just chose."""
        self.run_dir.save_weights(self.run_dir.best_model_path, arrays, {"round": server_round})

    def save_round(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        *,
        tracker: Mapping[str, Any],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """The latest round's checkpoint (what ``--resume`` continues from) and, if kept, its snapshot."""
        self.run_dir.save_weights(
            self.run_dir.last_checkpoint_path,
            arrays,
            {"round": server_round, "tracker": tracker},
            strategy_state=strategy_state,
        )
        if self.snapshots > 0:
            self.run_dir.save_snapshot(server_round, arrays, self.snapshots)

    def save_final(self, arrays: Mapping[str, np.ndarray], last_round: int | None) -> None:
        """The model the run ends with."""
        self.run_dir.save_weights(self.run_dir.model_path, arrays, {"round": last_round})
