"""Schemas of what a run produces besides the model: ``evaluate`` (after the last round) and ``tracking``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medfed.common.config.checks import require_count
from medfed.common.errors import ConfigError

__all__ = [
    "EvaluateConfig",
    "TrackingConfig",
]

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """What happens after the last round: federated temperature scaling on the hospitals' validation splits, the
    coordinator's uncertainty analysis on the test set (MC dropout, snapshot ensemble, referral), and Grad-CAM maps
    each hospital computes and keeps."""

    calibrate: bool = True
    mc_samples: int = 0
    snapshots: int = 0
    gradcam_samples: int = 0
    # after the last round, every hospital that allows it attacks the selected model with membership inference
    # on its own data (loss threshold; with audit_shadows > 0 also offline LiRA with that many shadow models it
    # trains itself); only attack AUC and TPRs leave, outside DP's guarantee (docs/operations.md)
    audit: bool = False
    audit_shadows: int = 0
    # whether the run reads the test split at all (simulation): false for `medfed tune`'s trials, whose choices must
    # rest on validation data only; the loader then refuses the test split and no test metrics are reported
    test_split: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.calibrate, bool):
            raise ConfigError(f"evaluate.calibrate={self.calibrate!r} is not allowed; it must be true or false.")
        require_count("evaluate.mc_samples", self.mc_samples, minimum=2, meaning="stochastic passes with dropout on")
        require_count("evaluate.snapshots", self.snapshots, minimum=2, meaning="global models of the last rounds")
        require_count("evaluate.gradcam_samples", self.gradcam_samples, minimum=1, meaning="maps per hospital")
        if not isinstance(self.test_split, bool):
            raise ConfigError(f"evaluate.test_split={self.test_split!r} is not allowed; it must be true or false.")
        if not isinstance(self.audit, bool):
            raise ConfigError(f"evaluate.audit={self.audit!r} is not allowed; it must be true or false.")
        if isinstance(self.audit_shadows, bool) or not isinstance(self.audit_shadows, int) or \
                not 0 <= self.audit_shadows <= 64:
            raise ConfigError(f"evaluate.audit_shadows={self.audit_shadows!r} is out of range; it must be an integer "
                              "in [0, 64] (0: the loss-threshold attack only; LiRA needs 4 or more to be useful).")
        if self.audit_shadows > 0 and not self.audit:
            raise ConfigError(f"evaluate.audit_shadows={self.audit_shadows} asks for LiRA shadow models, but "
                              "evaluate.audit=false; set evaluate.audit=true or evaluate.audit_shadows=0.")

    @property
    def final_stages(self) -> bool:
        """Whether the run asks the hospitals for the final stages (calibrate, reliability) after its last round:
        for temperature scaling, or to carry the request for Grad-CAM maps."""
        return self.calibrate or self.gradcam_samples > 0


@dataclass
class TrackingConfig:
    """Optional extra outputs of every run: TensorBoard event files of the per-round metrics."""

    tensorboard: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tracking.tensorboard={self.tensorboard!r} is not allowed; it must be true or false.")

    def require_runtime(self) -> None:
        """Fail before the first round when TensorBoard logging is asked for and its package is missing."""
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "tracking.tensorboard=true needs the tensorboard package: pip install 'medfed[tensorboard]' "
                    "(or set tracking.tensorboard=false)."
                ) from None
