"""Per-round bookkeeping shared by federated runs and baselines: metrics lines, model selection, checkpoints,
summary. :class:`RunTracker` coordinates the parts (see ``tracker``)."""

from medfed.common.metrics import selection_key
from medfed.server.tracking.rounds import SiteRound, site_rounds, weighted_metrics
from medfed.server.tracking.sinks import RoundSink
from medfed.server.tracking.state import TrackerState
from medfed.server.tracking.tracker import RunTracker

__all__ = ["RoundSink", "RunTracker", "SiteRound", "TrackerState", "selection_key", "site_rounds", "weighted_metrics"]
