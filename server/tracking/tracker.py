"""The run tracker: per-round bookkeeping shared by federated runs and baselines.

:class:`RunTracker` coordinates the parts, each in its own module: the round's numbers (``rounds``), the typed
state carried across rounds and checkpoints (``state``), model selection on validation data (``selection``), the
weight files (``checkpoints``), and the outputs (``sinks``: ``metrics.jsonl``, TensorBoard, ``summary.json``, built
by ``summary``).

Model selection uses validation data only. The best round is the one with the best federated validation AUC
(the sample-weighted mean over hospitals whose validation split has both classes); when no round has a defined
AUC (every validation split holds one class) the lowest validation loss decides. The test set is only ever
*reported* at the selected round, never used to select.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed.common.metrics import selection_key
from medfed.server.runs import RunDirectory
from medfed.server.tracking.checkpoints import Checkpoints
from medfed.server.tracking.rounds import SiteRound, round_record, weighted_metrics
from medfed.server.tracking.selection import select_global, select_parts, select_sites
from medfed.server.tracking.sinks import MetricsLines, RoundSink, SummaryFile, TensorBoardEvents
from medfed.server.tracking.state import RoundResult, RunPrivacy, TrackerState
from medfed.server.tracking.summary import summary_for

__all__ = ["RunTracker"]

logger = logging.getLogger(__name__)


class RunTracker:
    """Writes metrics.jsonl, checkpoints and summary.json of one run; resumable from its own checkpointed state."""

    def __init__(
        self,
        run_dir: RunDirectory,
        *,
        mode: str,
        total_rounds: int,
        t0: float,
        state: Mapping[str, Any] | None = None,
        snapshots: int = 0,
        tensorboard: bool = False,
        sinks: Sequence[RoundSink] = (),
        patience: int = 0,
    ) -> None:
        """``state``: the tracker state a checkpoint holds (``--resume``); ``sinks``: more outputs (a console
        display, say) that see every round's record and the summary after the run's own files; ``patience``:
        ``train.patience`` (0: no early stopping)."""
        self.run_dir = run_dir
        self.patience = patience
        self.mode = mode
        self.total_rounds = total_rounds
        self.t0 = t0
        self.state = TrackerState.from_checkpoint(state)
        self._checkpoints = Checkpoints(run_dir, snapshots=snapshots)
        self._summary = summary_for(run_dir, mode=mode, total_rounds=total_rounds)
        self._sinks: list[RoundSink] = [MetricsLines(run_dir)]
        if tensorboard:
            self._sinks.append(TensorBoardEvents(run_dir))
        self._sinks.append(SummaryFile(run_dir))
        self._sinks.extend(sinks)

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def best_round(self) -> int | None:
        """The round selection has chosen so far (None before any)."""
        return self.state.best.server_round if self.state.best is not None else None

    @property
    def stopped_early(self) -> str | None:
        """Why the run stops before its planned rounds (``train.patience`` ran out), or None: the runner sends no
        more rounds once this is set, and a resumed run that had stopped trains no further."""
        return self.state.stopped_early

    @property
    def last_round(self) -> int | None:
        """The latest recorded round (None before any)."""
        return self.state.last.server_round if self.state.last is not None else None

    def wall_s(self) -> float:
        """Wall time of the run so far, earlier sessions of a resumed run included."""
        return self.state.wall_before_s + (time.time() - self.t0)

    def checkpoint_state(self) -> dict[str, Any]:
        """The tracker state as the latest checkpoint holds it (what ``state=`` takes back on resume)."""
        return self.state.to_checkpoint(wall_s=self.wall_s(), mode=self.mode)

    def add_compute(self, seconds: float) -> None:
        """Count compute that belongs to no round (the server's evaluation of the initial model)."""
        self.state.compute_s += seconds

    def note_central_privacy(self, *, epsilon: float, delta: float, accountant_state: dict[str, Any]) -> None:
        """Central DP: what Flower's accountant has spent so far, and its state (checkpointed with the round)."""
        self.state.run_privacy = RunPrivacy(run_epsilon=epsilon, delta=delta)
        self.state.accountant_state = accountant_state

    def note_distributed_privacy(self, assumptions: Mapping[str, Any]) -> None:
        """Distributed DP: the plan and the trust assumptions every site's epsilon rests on (summary, report)."""
        self.state.privacy_assumptions = dict(assumptions)

    # --- rounds --------------------------------------------------------------------------------------------------
    def record_round(
        self,
        server_round: int,
        *,
        sites: Mapping[str, SiteRound],
        test: Mapping[str, float] | None,
        arrays: Mapping[str, np.ndarray] | None,
        server_s: float = 0.0,
        dropped: list[dict[str, str]] | None = None,
        extra: Mapping[str, Any] | None = None,
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Record a finished round: update selection, checkpoint (with the strategy's state, for an exact resume),
        then append its metrics line; returns that line's record."""
        state = self.state
        dropped = list(dropped or [])
        round_compute = server_s + sum(s.train_s + s.eval_s for s in sites.values())
        state.compute_s += round_compute
        state.dropped_total += len(dropped)
        val = weighted_metrics(sites)
        record = round_record(
            server_round, mode=self.mode, sites=sites, val=val, test=test, dropped=dropped,
            round_compute_s=round_compute, compute_s=state.compute_s, elapsed_s=self.wall_s(),
            run_privacy=_run_privacy(state), extra=extra,
        )
        state.note_sites(sites)
        select_sites(state, server_round, sites)
        select_parts(state, server_round, sites)
        if select_global(state, server_round, val, test) and arrays is not None:
            self._checkpoints.save_best(server_round, arrays)
        state.last = RoundResult(server_round, val, dict(test) if test is not None else None)
        if val and (state.improved is None or _improves(val, state.improved.val)):
            state.improved = RoundResult(server_round, val)
        self._check_patience(server_round)
        if arrays is not None:
            self._checkpoints.save_round(server_round, arrays, tracker=self.checkpoint_state(),
                                         strategy_state=strategy_state)
        for sink in self._sinks:
            sink.on_round(record)
        return record

    def _check_patience(self, server_round: int) -> None:
        """Stop early (before the round is checkpointed, so a resumed run stays stopped) once ``patience`` rounds
        in a row have not improved on the best validation so far; never after the last planned round."""
        improved = self.state.improved
        if (self.patience <= 0 or self.state.stopped_early is not None or improved is None
                or server_round >= self.total_rounds or server_round - improved.server_round < self.patience):
            return
        self.state.stopped_early = (
            f"early stopping: {server_round - improved.server_round} rounds without a better validation than round "
            f"{improved.server_round}'s (train.patience={self.patience}); stopped after round {server_round} of "
            f"{self.total_rounds}")
        logger.info("%s", self.state.stopped_early)

    # --- end -----------------------------------------------------------------------------------------------------
    def finish(
        self, arrays: Mapping[str, np.ndarray] | None, *, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the final weights and summary.json; return the summary."""
        if arrays is not None:
            self._checkpoints.save_final(arrays, self.last_round)
        summary = self._summary.build(self.state, wall_s=self.wall_s())
        if self.state.stopped_early is not None:
            summary["stopped"] = self.state.stopped_early
        if extra:
            summary.update(extra)
        try:
            for sink in self._sinks:
                sink.on_summary(summary)
        finally:
            self.close()
        return summary

    def close(self) -> None:
        """Close every sink (the TensorBoard writer, if one was opened)."""
        for sink in self._sinks:
            sink.close()


IMPROVEMENT = 1e-6
"""Early stopping's tolerance: a validation number that moved by less than this is a tie (a learning rate too
small to move the weights still moves a zero bias by ~1e-12, and so the loss)."""


def _improves(val: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether ``val`` is better than ``than`` in model selection's order (AUC, balanced accuracy, loss), each
    number by more than :data:`IMPROVEMENT`."""
    for new, old in zip(selection_key(val), selection_key(than), strict=True):
        if new > old + IMPROVEMENT:
            return True
        if new < old - IMPROVEMENT:
            return False
    return False


def _run_privacy(state: TrackerState) -> dict[str, Any] | None:
    """The run-level privacy of a round's line: central DP's epsilon, distributed DP's assumptions."""
    out: dict[str, Any] = state.run_privacy.as_dict() if state.run_privacy is not None else {}
    if state.privacy_assumptions is not None:
        out["assumptions"] = state.privacy_assumptions
    return out or None
