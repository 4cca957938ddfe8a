"""Per-round bookkeeping shared by federated runs and baselines: metrics lines, model selection, checkpoints.

Model selection uses validation data only. The best round is the one with the best federated validation AUC
(the sample-weighted mean over hospitals whose validation split has both classes); when no round has a defined
AUC (every validation split holds one class) the lowest validation loss decides. The test set is only ever
*reported* at the selected round, never used to select.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.common import keys
from medfed.common.metrics import selection_key
from medfed.server.runs import RunDirectory

__all__ = ["RunTracker", "SiteRound", "selection_key", "site_rounds", "weighted_metrics"]

logger = logging.getLogger(__name__)


@dataclass
class SiteRound:
    """One hospital's scalars in one round (any of them may be missing when the site dropped out)."""

    n_train: int | None = None
    n_val: int | None = None
    train_loss: float | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None  # only for the local-only baseline (each site's own model)
    epsilon: float | None = None  # with DP: the site's cumulative epsilon after this round (all runs on its data)
    delta: float | None = None
    # personalisation: the site's personalised model (global + its own layers) and, after the last round, its
    # locally fine-tuned one: {"val": {...}, "test": {...}} (test in simulation only)
    personal: dict[str, dict[str, float]] | None = None
    finetuned: dict[str, Any] | None = None
    # the ensemble of the global model with the personalised (and, after the last round, fine-tuned) ones
    ensemble: dict[str, dict[str, float]] | None = None

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"n_train": self.n_train, "n_val": self.n_val, "train_loss": self.train_loss,
                                  "train_s": self.train_s, "eval_s": self.eval_s}
        record["val"] = dict(self.val)
        if self.test is not None:
            record["test"] = dict(self.test)
        if self.epsilon is not None:
            record["epsilon"], record["delta"] = self.epsilon, self.delta
        if self.personal is not None:
            record["personal"] = self.personal
        if self.finetuned is not None:
            record["finetuned"] = self.finetuned
        if self.ensemble is not None:
            record["ensemble"] = self.ensemble
        return record


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def _personal_parts(metrics: Mapping[str, float], val_prefix: str, test_prefix: str) -> dict[str, Any] | None:
    val = _prefixed(metrics, val_prefix)
    if not val:
        return None
    test = _prefixed(metrics, test_prefix)
    return {"val": val, "test": test} if test else {"val": val}


def site_rounds(
    train: Mapping[str, Mapping[str, float]], evaluate: Mapping[str, Mapping[str, float]]
) -> dict[str, SiteRound]:
    """Per-site records of a round from the scalar metrics each hospital replied with, by site id."""
    sites: dict[str, SiteRound] = {}
    for site_id, metrics in train.items():
        site = sites.setdefault(site_id, SiteRound())
        site.n_train = int(metrics.get(keys.N_TRAIN, metrics.get(keys.NUM_EXAMPLES, 0)))
        site.train_loss = metrics.get(keys.TRAIN_LOSS)
        site.train_s = metrics.get(keys.TRAIN_TIME_S, 0.0)
        site.epsilon = metrics.get(keys.EPSILON)
        site.delta = metrics.get(keys.DELTA)
    for site_id, metrics in evaluate.items():
        site = sites.setdefault(site_id, SiteRound())
        site.n_val = int(metrics.get(keys.N_VAL, metrics.get(keys.NUM_EXAMPLES, 0)))
        if site.n_train is None and keys.N_TRAIN in metrics:  # a site that evaluated but did not train
            site.n_train = int(metrics[keys.N_TRAIN])
        site.eval_s = metrics.get(keys.EVAL_TIME_S, 0.0)
        site.val = _prefixed(metrics, keys.EVAL_PREFIX)
        site.personal = _personal_parts(metrics, keys.PERSONAL_PREFIX, keys.PERSONAL_TEST_PREFIX)
        site.finetuned = _personal_parts(metrics, keys.FINETUNED_PREFIX, keys.FINETUNED_TEST_PREFIX)
        site.ensemble = _personal_parts(metrics, keys.ENSEMBLE_PREFIX, keys.ENSEMBLE_TEST_PREFIX)
        if site.finetuned is not None and keys.FINETUNED_EPOCH in metrics:
            site.finetuned["epoch"] = int(metrics[keys.FINETUNED_EPOCH])
    return sites


def weighted_metrics(
    sites: Mapping[str, SiteRound], of: Callable[[SiteRound], Mapping[str, float]] = lambda s: s.val
) -> dict[str, float]:
    """Validation metrics (``of`` each site: by default the global model's) averaged over sites weighted by
    validation size, each skipping sites where undefined."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for site in sites.values():
        w = float(site.n_val or 0)
        for key, value in of(site).items():
            sums.setdefault(key, 0.0)
            weights.setdefault(key, 0.0)
            if w > 0 and value is not None and math.isfinite(value):
                sums[key] += w * value
                weights[key] += w
    return {k: (sums[k] / weights[k] if weights[k] > 0 else math.nan) for k in sums}


def _mean_min_max(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(np.mean(finite)), "min": float(np.min(finite)), "max": float(np.max(finite))}


class RunTracker:
    """Writes metrics.jsonl, checkpoints and summary.json of one run; resumable from its own state."""

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
    ) -> None:
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self._writer: Any = None
        self.snapshots = snapshots  # keep the global models of this many latest rounds (snapshot ensemble)
        self.mode = mode
        self.total_rounds = total_rounds
        self.t0 = t0
        state = dict(state or {})
        self.compute_s: float = float(state.get("compute_s", 0.0))
        self.wall_before_s: float = float(state.get("wall_s", 0.0))  # wall time of earlier sessions (resume)
        self.best: dict[str, Any] | None = state.get("best")
        self.site_best: dict[str, dict[str, Any]] = dict(state.get("site_best", {}))
        self.site_sizes: dict[str, dict[str, int | None]] = dict(state.get("site_sizes", {}))
        self.last: dict[str, Any] | None = state.get("last")
        self.dropped_total: int = int(state.get("dropped_total", 0))
        self.site_privacy: dict[str, dict[str, float | None]] = dict(state.get("site_privacy", {}))
        # central DP: Flower's accountant state (JSON), checkpointed so a resumed run keeps counting
        self.accountant_state: dict[str, Any] | None = state.get("accountant_state")
        self.run_privacy: dict[str, float] | None = state.get("run_privacy")
        # personalisation: the round with the best weighted personalised validation AUC, each site's personalised
        # metrics in it, and the fine-tuned metrics of the last round
        self.personal_best: dict[str, Any] | None = state.get("personal_best")
        self.ensemble_best: dict[str, Any] | None = state.get("ensemble_best")
        self.finetuned: dict[str, Any] | None = state.get("finetuned")

    # --- state ---------------------------------------------------------------------------------------------------
    def wall_s(self) -> float:
        return self.wall_before_s + (time.time() - self.t0)

    def state(self) -> dict[str, Any]:
        return {
            "compute_s": self.compute_s,
            "wall_s": self.wall_s(),
            "best": self.best,
            "site_best": self.site_best,
            "site_sizes": self.site_sizes,
            "last": self.last,
            "dropped_total": self.dropped_total,
            "site_privacy": self.site_privacy,
            "accountant_state": self.accountant_state,
            "run_privacy": self.run_privacy,
            "personal_best": self.personal_best,
            "ensemble_best": self.ensemble_best,
            "finetuned": self.finetuned,
            "mode": self.mode,
        }

    # --- rounds --------------------------------------------------------------------------------------------------
    def add_compute(self, seconds: float) -> None:
        """Count compute that belongs to no round (the server's evaluation of the initial model)."""
        self.compute_s += seconds

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
        then append its metrics line."""
        dropped = list(dropped or [])
        round_compute = server_s + sum(s.train_s + s.eval_s for s in sites.values())
        self.compute_s += round_compute
        self.dropped_total += len(dropped)
        val = weighted_metrics(sites)
        train_losses = [(s.train_loss, s.n_train or 0) for s in sites.values() if s.train_loss is not None]
        total = sum(n for _, n in train_losses)
        train_loss = sum(v * n for v, n in train_losses) / total if total > 0 else math.nan
        record: dict[str, Any] = {
            "round": server_round,
            "mode": self.mode,
            "train": {"loss": train_loss},
            "val": val,
            "test": dict(test) if test is not None else None,
            "sites": {site_id: s.as_record() for site_id, s in sorted(sites.items())},
            "dropped": dropped,
            "round_compute_s": round_compute,
            "compute_s": self.compute_s,
            "elapsed_s": self.wall_s(),
        }
        epsilons = [s.epsilon for s in sites.values() if s.epsilon is not None]
        if epsilons:
            record["privacy"] = {"max_epsilon": max(epsilons)}
        if self.run_privacy is not None:
            record["privacy"] = {**record.get("privacy", {}), **self.run_privacy}
        if extra:
            record.update(extra)

        for site_id, s in sites.items():
            if s.epsilon is not None:
                self.site_privacy[site_id] = {"epsilon": s.epsilon, "delta": s.delta}
            sizes = self.site_sizes.setdefault(site_id, {"n_train": None, "n_val": None})
            sizes["n_train"] = s.n_train if s.n_train is not None else sizes["n_train"]
            sizes["n_val"] = s.n_val if s.n_val is not None else sizes["n_val"]
            if s.val and (
                site_id not in self.site_best
                or selection_key(s.val) > selection_key(self.site_best[site_id]["val"])
            ):
                self.site_best[site_id] = {"round": server_round, "val": dict(s.val), "test": s.test}

        self._record_personal(server_round, sites)
        improved = self.best is None or selection_key(val) > selection_key(self.best["val"])
        if improved and (val or test is not None):
            self.best = {"round": server_round, "val": val, "test": dict(test) if test is not None else None}
            if arrays is not None:
                self.run_dir.save_weights(self.run_dir.best_model_path, arrays, {"round": server_round})
        self.last = {"round": server_round, "val": val, "test": dict(test) if test is not None else None}
        if arrays is not None:
            self.run_dir.save_weights(
                self.run_dir.last_checkpoint_path,
                arrays,
                {"round": server_round, "tracker": self.state()},
                strategy_state=strategy_state,
            )
            if self.snapshots > 0:
                self.run_dir.save_snapshot(server_round, arrays, self.snapshots)
        self.run_dir.append_metrics(record)
        if self.tensorboard:
            self._log_tensorboard(record)
        return record

    def _log_tensorboard(self, record: Mapping[str, Any]) -> None:
        """The round's scalars as TensorBoard events in ``RUN_DIR/tensorboard`` (global, per site, privacy)."""
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

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _record_personal(self, server_round: int, sites: Mapping[str, SiteRound]) -> None:
        """Select the personalised models' best round on their validation metrics; keep the fine-tuned ones."""
        self.personal_best = self._select(server_round, sites, lambda s: s.personal, self.personal_best)
        self.ensemble_best = self._select(server_round, sites, lambda s: s.ensemble, self.ensemble_best)
        tuned = {k: s for k, s in sites.items() if s.finetuned is not None}
        if tuned:
            self.finetuned = {"round": server_round,
                              "val": weighted_metrics(tuned, lambda s: (s.finetuned or {}).get("val", {})),
                              "sites": {k: s.finetuned for k, s in sorted(tuned.items())}}

    @staticmethod
    def _select(
        server_round: int,
        sites: Mapping[str, SiteRound],
        part: Callable[[SiteRound], dict[str, Any] | None],
        best: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """The round whose weighted validation metrics of the sites' ``part`` model are best so far."""
        chosen = {k: s for k, s in sites.items() if part(s) is not None}
        if not chosen:
            return best
        val = weighted_metrics(chosen, lambda s: (part(s) or {}).get("val", {}))
        if best is None or selection_key(val) > selection_key(best["val"]):
            return {"round": server_round, "val": val, "sites": {k: part(s) for k, s in sorted(chosen.items())}}
        return best

    @staticmethod
    def _personal_summary(part: Mapping[str, Any]) -> dict[str, Any]:
        """A personalised part of the summary: its round, weighted validation metrics, and the sites' test metrics
        (each hospital's own model on the global test set: mean, min, max over hospitals)."""
        tests = [(s.get("test") or {}) for s in part["sites"].values()]
        summary: dict[str, Any] = {"round": part["round"], "val": part["val"], "sites": part["sites"]}
        if any(tests):
            summary["test"] = {
                metric: _mean_min_max([t.get(metric, math.nan) for t in tests]) for metric in ("auc", "acc")
            }
        return summary

    # --- end -----------------------------------------------------------------------------------------------------
    def finish(
        self, arrays: Mapping[str, np.ndarray] | None, *, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the final weights and summary.json; return the summary."""
        if arrays is not None:
            self.run_dir.save_weights(self.run_dir.model_path, arrays, {"round": (self.last or {}).get("round")})
        wall = self.wall_s()
        sites: dict[str, Any] = {}
        for site_id in sorted(set(self.site_sizes) | set(self.site_best)):
            entry: dict[str, Any] = dict(self.site_sizes.get(site_id, {}))
            best_round = self.best["round"] if self.best else None
            # federated: a site's validation metrics at the federation's best round; local: at its own best round
            entry["val"] = self._site_val_at(site_id, best_round) if self.mode != "local" else {}
            if site_id in self.site_best:
                entry["best_round"] = self.site_best[site_id]["round"]
                if self.mode == "local":
                    entry["val"] = self.site_best[site_id]["val"]
                    entry["test"] = self.site_best[site_id]["test"]
            if site_id in self.site_privacy:
                entry.update(self.site_privacy[site_id])
            sites[site_id] = entry
        summary: dict[str, Any] = {
            "mode": self.mode,
            "rounds": (self.last or {}).get("round", 0),
            "planned_rounds": self.total_rounds,
            "best": self.best,
            "final": self.last,
            "sites": sites,
            "wall_s": wall,
            "compute_s": self.compute_s,
            "overhead": wall / self.compute_s if self.compute_s > 0 else math.nan,
            "dropped": self.dropped_total,
        }
        if self.site_privacy:
            summary["privacy"] = {
                "max_epsilon": max(float(p["epsilon"] or 0.0) for p in self.site_privacy.values()),
                "delta": max(float(p["delta"] or 0.0) for p in self.site_privacy.values()),
            }
        if self.run_privacy is not None:
            summary["privacy"] = {**summary.get("privacy", {}), **self.run_privacy}
        if self.personal_best is not None:
            summary["personalized"] = self._personal_summary(self.personal_best)
        if self.finetuned is not None:
            summary["finetuned"] = self._personal_summary(self.finetuned)
        if self.ensemble_best is not None:
            summary["ensemble"] = self._personal_summary(self.ensemble_best)
        if self.mode == "local":
            # each hospital alone: its own model, selected at its own best-validation round
            auc = _mean_min_max([(s.get("test") or {}).get("auc", math.nan) for s in sites.values()])
            acc = _mean_min_max([(s.get("test") or {}).get("acc", math.nan) for s in sites.values()])
            summary["local"] = {"test_auc": auc, "test_acc": acc}
            val_auc = _mean_min_max([(s.get("val") or {}).get("auc", math.nan) for s in sites.values()])
            summary["best"] = {
                "round": None,
                "val": {"auc": val_auc["mean"]},
                "test": {"auc": auc["mean"], "acc": acc["mean"]},
            }
        if extra:
            summary.update(extra)
        self.close()
        self.run_dir.write_summary(summary)
        return summary

    def _site_val_at(self, site_id: str, server_round: int | None) -> dict[str, float]:
        if server_round is None:
            return {}
        for record in reversed(self.run_dir.read_metrics()):
            if record.get("round") == server_round:
                return dict((record.get("sites", {}).get(site_id) or {}).get("val") or {})
        return {}
