"""Model selection on validation data only: the federation's best round, each site's best round, and the best
round of each personalised part (personalised, ensemble); the test set is reported at the chosen round, never used
to choose.

A round beats another by :func:`medfed.common.metrics.selection_key` of their weighted validation metrics: any
defined AUC beats none, then the higher AUC, then (on a tie) the higher balanced accuracy and the lower validation
loss, else the lower validation loss (a validation split holding one class has no AUC); a round that ties the best
in all of these replaces it, having had more training.

Under metered DP evaluation the federation's validation AUC carries the hospitals' noise, whose standard error
(``auc_noise_se``) the coordinator knows. There the one-standard-error rule chooses: the latest round whose noised
AUC is within one standard error of the best seen so far, since a round the noise cannot tell from the best has had
more training. When the noise is small this is the best round; when it swamps the differences, the latest round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from medfed.common.metrics import selection_key
from medfed.server.tracking.rounds import SiteRound, weighted_metrics
from medfed.server.tracking.state import PartSelection, RoundResult, TrackerState

__all__ = ["beats", "select_global", "select_parts", "select_sites"]

logger = logging.getLogger(__name__)


def beats(val: Mapping[str, Any], best: RoundResult | PartSelection | None) -> bool:
    """Whether validation metrics ``val`` (a later round's) beat or tie the best so far (anything beats nothing)."""
    return best is None or selection_key(val) >= selection_key(best.val)


def _number(value: Any) -> float:
    """A metric as a float (None, as JSON has it, is nan)."""
    return float(value) if value is not None else math.nan


def select_global(
    state: TrackerState, server_round: int, val: dict[str, float], test: Mapping[str, float] | None
) -> bool:
    """Make this round the federation's best when its weighted validation beats the best so far (a round with
    neither validation nor test metrics is never chosen; noised validation: the one-standard-error rule of the
    module's docstring); True when it did."""
    if "auc_noise_se" in val:  # noised validation: an AUC the noise leaves undefined tells nothing either
        auc, se = _number(val.get("auc")), _number(val["auc_noise_se"])
        if math.isfinite(auc) and math.isfinite(se):
            top = max(auc, state.noised_auc_max if state.noised_auc_max is not None else -math.inf)
            state.noised_auc_max = top
            if auc < top - se:
                return False
        state.best = RoundResult(server_round, val, dict(test) if test is not None else None)
        return True
    if beats(val, state.best) and (val or test is not None):
        state.best = RoundResult(server_round, val, dict(test) if test is not None else None)
        return True
    return False


def select_sites(state: TrackerState, server_round: int, sites: Mapping[str, SiteRound]) -> None:
    """Each site's best round on its own validation split (the local-only baseline reports it)."""
    for site_id, s in sites.items():
        if s.val and beats(s.val, state.site_best.get(site_id)):
            state.site_best[site_id] = RoundResult(server_round, dict(s.val), s.test)


def _select_part(
    server_round: int,
    sites: Mapping[str, SiteRound],
    part: Callable[[SiteRound], dict[str, Any] | None],
    best: PartSelection | None,
) -> PartSelection | None:
    """The round whose weighted validation metrics of the sites' ``part`` model are best so far."""
    chosen = {k: s for k, s in sites.items() if part(s) is not None}
    if not chosen:
        return best
    val = weighted_metrics(chosen, lambda s: (part(s) or {}).get("val", {}))
    if beats(val, best):
        return PartSelection(server_round, val, {k: p for k, s in sorted(chosen.items()) if (p := part(s)) is not None})
    return best


def select_parts(state: TrackerState, server_round: int, sites: Mapping[str, SiteRound]) -> None:
    """Select the personalised and ensemble models' best rounds on their validation metrics; keep the latest
    fine-tuned ones (they come after the last round only)."""
    state.personal_best = _select_part(server_round, sites, lambda s: s.personal, state.personal_best)
    state.ensemble_best = _select_part(server_round, sites, lambda s: s.ensemble, state.ensemble_best)
    tuned = {k: s for k, s in sites.items() if s.finetuned is not None}
    if tuned:
        state.finetuned = PartSelection(
            server_round,
            weighted_metrics(tuned, lambda s: (s.finetuned or {}).get("val", {})),
            {k: s.finetuned for k, s in sorted(tuned.items()) if s.finetuned is not None},
        )
