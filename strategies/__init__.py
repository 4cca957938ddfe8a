"""Aggregation strategies: Flower's Message-API strategies by name, plus medfed's wrappers."""

from medfed.strategies.metrics import weighted_mean_ignoring_nan
from medfed.strategies.observed import ObservedStrategy, RoundObservations, SiteDrop
from medfed.strategies.registry import available_strategies, build_strategy, require_strategy, with_central_dp

__all__ = [
    "ObservedStrategy",
    "RoundObservations",
    "SiteDrop",
    "available_strategies",
    "build_strategy",
    "require_strategy",
    "weighted_mean_ignoring_nan",
    "with_central_dp",
]
