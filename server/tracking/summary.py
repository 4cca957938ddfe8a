"""``summary.json``: the best round (by federated validation), the final round, one entry per site, timings,
privacy spent and the personalised parts.

Two layouts: a federation (and the centralized baseline) reports each site's validation metrics at the
federation's best round; the local-only baseline (each hospital alone) reports each site at its own best round and
the spread of the hospitals' test metrics.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from medfed.server.runs import RunDirectory
from medfed.server.tracking.rounds import mean_min_max
from medfed.server.tracking.state import PartSelection, TrackerState

__all__ = ["FederatedSummary", "LocalSummary", "summary_for"]

logger = logging.getLogger(__name__)


def _part_summary(part: PartSelection) -> dict[str, Any]:
    """A personalised part of the summary: its round, weighted validation metrics, and the sites' test metrics
    (each hospital's own model on the global test set: mean, min, max over hospitals)."""
    tests = [(s.get("test") or {}) for s in part.sites.values()]
    summary: dict[str, Any] = {"round": part.server_round, "val": part.val, "sites": part.sites}
    if any(tests):
        summary["test"] = {
            metric: mean_min_max([t.get(metric, math.nan) for t in tests]) for metric in ("auc", "acc")
        }
    return summary


class FederatedSummary:
    """The summary of a federation (or of the centralized baseline): one model, selected at its best round."""

    def __init__(self, run_dir: RunDirectory, *, mode: str, total_rounds: int) -> None:
        self.run_dir = run_dir
        self.mode = mode
        self.total_rounds = total_rounds

    def build(self, state: TrackerState, *, wall_s: float) -> dict[str, Any]:
        """The summary of the run as ``state`` holds it after ``wall_s`` seconds."""
        sites: dict[str, Any] = {}
        for site_id in sorted(set(state.site_sizes) | set(state.site_best)):
            sizes = state.site_sizes.get(site_id)
            entry: dict[str, Any] = sizes.as_dict() if sizes is not None else {}
            self._site_metrics(entry, site_id, state)
            if site_id in state.site_privacy:
                entry.update(state.site_privacy[site_id].as_dict())
            sites[site_id] = entry
        last = state.last.as_dict() if state.last is not None else None
        summary: dict[str, Any] = {
            "mode": self.mode,
            "rounds": (last or {}).get("round", 0),
            "planned_rounds": self.total_rounds,
            "best": state.best.as_dict() if state.best is not None else None,
            "final": last,
            "sites": sites,
            "wall_s": wall_s,
            "compute_s": state.compute_s,
            "overhead": wall_s / state.compute_s if state.compute_s > 0 else math.nan,
            "dropped": state.dropped_total,
        }
        if state.site_privacy:
            summary["privacy"] = {
                "max_epsilon": max(float(p.epsilon or 0.0) for p in state.site_privacy.values()),
                "delta": max(float(p.delta or 0.0) for p in state.site_privacy.values()),
            }
        if state.run_privacy is not None:
            summary["privacy"] = {**summary.get("privacy", {}), **state.run_privacy.as_dict()}
        if state.privacy_assumptions is not None:
            summary["privacy"] = {**summary.get("privacy", {}), "assumptions": state.privacy_assumptions}
        if state.personal_best is not None:
            summary["personalized"] = _part_summary(state.personal_best)
        if state.finetuned is not None:
            summary["finetuned"] = _part_summary(state.finetuned)
        if state.ensemble_best is not None:
            summary["ensemble"] = _part_summary(state.ensemble_best)
        self._conclude(summary, sites)
        return summary

    def _site_metrics(self, entry: dict[str, Any], site_id: str, state: TrackerState) -> None:
        """A site's validation metrics at the federation's best round (and the round of its own best)."""
        entry["val"] = self._site_val_at(site_id, state.best.server_round if state.best is not None else None)
        if site_id in state.site_best:
            entry["best_round"] = state.site_best[site_id].server_round

    def _conclude(self, summary: dict[str, Any], sites: dict[str, Any]) -> None:
        """Layout-specific sections (none for a federation)."""

    def _site_val_at(self, site_id: str, server_round: int | None) -> dict[str, float]:
        if server_round is None:
            return {}
        for record in reversed(self.run_dir.read_metrics()):
            if record.get("round") == server_round:
                return dict((record.get("sites", {}).get(site_id) or {}).get("val") or {})
        return {}


class LocalSummary(FederatedSummary):
    """The local-only baseline's summary: each hospital alone, its own model selected at its own best round."""

    def _site_metrics(self, entry: dict[str, Any], site_id: str, state: TrackerState) -> None:
        entry["val"] = {}
        if site_id in state.site_best:
            best = state.site_best[site_id]
            entry["best_round"] = best.server_round
            entry["val"] = best.val
            entry["test"] = best.test

    def _conclude(self, summary: dict[str, Any], sites: dict[str, Any]) -> None:
        """The hospitals' test metrics at their own best rounds (mean, min, max), and their means as ``best``."""
        auc = mean_min_max([(s.get("test") or {}).get("auc", math.nan) for s in sites.values()])
        acc = mean_min_max([(s.get("test") or {}).get("acc", math.nan) for s in sites.values()])
        summary["local"] = {"test_auc": auc, "test_acc": acc}
        val_auc = mean_min_max([(s.get("val") or {}).get("auc", math.nan) for s in sites.values()])
        summary["best"] = {
            "round": None,
            "val": {"auc": val_auc["mean"]},
            "test": {"auc": auc["mean"], "acc": acc["mean"]},
        }


def summary_for(run_dir: RunDirectory, *, mode: str, total_rounds: int) -> FederatedSummary:
    """The summary layout of a run of ``mode`` (``local``: the local-only baseline's; any other: a federation's)."""
    layout = LocalSummary if mode == "local" else FederatedSummary
    return layout(run_dir, mode=mode, total_rounds=total_rounds)
