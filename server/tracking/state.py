"""What a run's tracker remembers across rounds, typed, and its form in ``checkpoints/last.pt`` (for ``--resume``).

The checkpoint keeps the tracker state as the plain mapping it always held (``{"compute_s", "wall_s", "best",
"site_best", "site_sizes", "last", "dropped_total", "site_privacy", "accountant_state", "run_privacy",
"personal_best", "ensemble_best", "finetuned", "mode", "noised_auc_max", "privacy_assumptions", "improved", "stopped_early"}``, strict JSON values): :meth:`TrackerState.to_checkpoint`
writes exactly that, and :meth:`TrackerState.from_checkpoint` reads it back, missing keys taking their defaults, so
checkpoints written before the state was typed resume unchanged. Non-finite metrics come back as ``None``
(checkpoint metadata is strict JSON); selection treats ``None`` like nan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from medfed.server.tracking.rounds import SiteRound

__all__ = ["PartSelection", "RoundResult", "RunPrivacy", "SitePrivacy", "SiteSizes", "TrackerState"]

logger = logging.getLogger(__name__)

_In = TypeVar("_In")
_Out = TypeVar("_Out")
Metrics = dict[str, Any]  # metric name -> value (float; None where a checkpoint held nan)


@dataclass
class RoundResult:
    """A round's weighted validation metrics (which select) and test metrics (which are only reported)."""

    server_round: int
    val: Metrics
    test: Metrics | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.server_round, "val": self.val, "test": self.test}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundResult:
        return cls(server_round=data["round"], val=data["val"], test=data.get("test"))


@dataclass
class PartSelection:
    """The round chosen for a personalised part (personalised, fine-tuned or ensemble models): its weighted
    validation metrics and each site's metrics of that part in it."""

    server_round: int
    val: Metrics
    sites: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.server_round, "val": self.val, "sites": self.sites}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartSelection:
        return cls(server_round=data["round"], val=data["val"], sites=dict(data["sites"]))


@dataclass
class SiteSizes:
    """A site's latest known training and validation set sizes."""

    n_train: int | None = None
    n_val: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"n_train": self.n_train, "n_val": self.n_val}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteSizes:
        return cls(n_train=data.get("n_train"), n_val=data.get("n_val"))


@dataclass
class SitePrivacy:
    """A site's cumulative (epsilon, delta) as it last reported them (local DP)."""

    epsilon: float | None
    delta: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SitePrivacy:
        return cls(epsilon=data.get("epsilon"), delta=data.get("delta"))


@dataclass
class RunPrivacy:
    """Central DP: the run's (epsilon, delta) from Flower's accountant."""

    run_epsilon: float
    delta: float

    def as_dict(self) -> dict[str, float]:
        return {"run_epsilon": self.run_epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunPrivacy:
        return cls(run_epsilon=data["run_epsilon"], delta=data["delta"])


def _optional(value: _In | None, convert: Callable[[_In], _Out]) -> _Out | None:
    return convert(value) if value is not None else None


@dataclass
class TrackerState:
    """Everything the tracker carries from round to round (and from a stopped session to its resumption)."""

    compute_s: float = 0.0
    wall_before_s: float = 0.0  # wall time of earlier sessions of this run (resume)
    best: RoundResult | None = None  # the federation's best round by weighted validation
    last: RoundResult | None = None
    site_best: dict[str, RoundResult] = field(default_factory=dict)  # each site's best round on its own validation
    site_sizes: dict[str, SiteSizes] = field(default_factory=dict)
    site_privacy: dict[str, SitePrivacy] = field(default_factory=dict)
    dropped_total: int = 0
    # central DP: Flower's accountant state (JSON), checkpointed so a resumed run keeps counting
    accountant_state: dict[str, Any] | None = None
    run_privacy: RunPrivacy | None = None
    # distributed DP: the plan and trust assumptions every site's epsilon rests on
    privacy_assumptions: dict[str, Any] | None = None
    # personalisation: the round with the best weighted personalised (and ensemble) validation AUC, each site's
    # metrics in it, and the fine-tuned metrics of the last round that had any
    personal_best: PartSelection | None = None
    ensemble_best: PartSelection | None = None
    finetuned: PartSelection | None = None
    # metered DP evaluation: the highest noised validation AUC seen so far (the one-standard-error rule)
    noised_auc_max: float | None = None
    # early stopping (train.patience): the latest round whose validation was strictly better than every earlier
    # round's (a tie is no improvement, though selection lets it win), and why the run stopped before its planned
    # rounds (None while it runs on)
    improved: RoundResult | None = None
    stopped_early: str | None = None

    def note_sites(self, sites: Mapping[str, SiteRound]) -> None:
        """Keep each site's latest sizes (a missing value keeps the earlier one) and privacy spent."""
        for site_id, s in sites.items():
            if s.epsilon is not None:
                self.site_privacy[site_id] = SitePrivacy(epsilon=s.epsilon, delta=s.delta)
            sizes = self.site_sizes.setdefault(site_id, SiteSizes())
            sizes.n_train = s.n_train if s.n_train is not None else sizes.n_train
            sizes.n_val = s.n_val if s.n_val is not None else sizes.n_val

    def to_checkpoint(self, *, wall_s: float, mode: str) -> dict[str, Any]:
        """The mapping saved in the checkpoint's metadata (same keys, order and values as ever)."""
        return {
            "compute_s": self.compute_s,
            "wall_s": wall_s,
            "best": _optional(self.best, RoundResult.as_dict),
            "site_best": {k: v.as_dict() for k, v in self.site_best.items()},
            "site_sizes": {k: v.as_dict() for k, v in self.site_sizes.items()},
            "last": _optional(self.last, RoundResult.as_dict),
            "dropped_total": self.dropped_total,
            "site_privacy": {k: v.as_dict() for k, v in self.site_privacy.items()},
            "accountant_state": self.accountant_state,
            "run_privacy": _optional(self.run_privacy, RunPrivacy.as_dict),
            "personal_best": _optional(self.personal_best, PartSelection.as_dict),
            "ensemble_best": _optional(self.ensemble_best, PartSelection.as_dict),
            "finetuned": _optional(self.finetuned, PartSelection.as_dict),
            "mode": mode,
            "noised_auc_max": self.noised_auc_max,
            "privacy_assumptions": self.privacy_assumptions,
            "improved": _optional(self.improved, RoundResult.as_dict),
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any] | None) -> TrackerState:
        """The state a checkpoint holds (a fresh one for ``None``); keys an older checkpoint lacks take defaults."""
        data = dict(data or {})
        return cls(
            compute_s=float(data.get("compute_s", 0.0)),
            wall_before_s=float(data.get("wall_s", 0.0)),
            best=_optional(data.get("best"), RoundResult.from_dict),
            last=_optional(data.get("last"), RoundResult.from_dict),
            site_best={k: RoundResult.from_dict(v) for k, v in dict(data.get("site_best", {})).items()},
            site_sizes={k: SiteSizes.from_dict(v) for k, v in dict(data.get("site_sizes", {})).items()},
            site_privacy={k: SitePrivacy.from_dict(v) for k, v in dict(data.get("site_privacy", {})).items()},
            dropped_total=int(data.get("dropped_total", 0)),
            accountant_state=data.get("accountant_state"),
            run_privacy=_optional(data.get("run_privacy"), RunPrivacy.from_dict),
            privacy_assumptions=data.get("privacy_assumptions"),
            personal_best=_optional(data.get("personal_best"), PartSelection.from_dict),
            ensemble_best=_optional(data.get("ensemble_best"), PartSelection.from_dict),
            finetuned=_optional(data.get("finetuned"), PartSelection.from_dict),
            noised_auc_max=_optional(data.get("noised_auc_max"), float),
            improved=_optional(data.get("improved"), RoundResult.from_dict),
            stopped_early=_optional(data.get("stopped_early"), str),
        )
