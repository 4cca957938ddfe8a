"""Schemas of the ``privacy`` group: none, sample-level DP-SGD (``dp``) and client-level DP (``central_dp``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medfed.common.config.checks import require_choice, require_fraction, require_positive
from medfed.common.config.choices import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    PRIVACY_MECHANISMS,
    Accountant,
    GradSampleMode,
    PrivacyMechanism,
)
from medfed.common.errors import ConfigError

__all__ = [
    "CentralDPConfig",
    "DPConfig",
    "PrivacyConfig",
]

logger = logging.getLogger(__name__)


@dataclass
class PrivacyConfig:
    """Privacy mechanism the coordinator requests (``none``: images stay at the sites, nothing more)."""

    name: PrivacyMechanism = PrivacyMechanism.none
    # Flower's SecAgg+ (legacy workflow): the coordinator only ever sees the sum of the hospitals' updates
    secure_aggregation: bool = False
    secagg_shares: int = 0  # secret shares per hospital's key; 0 = every other hospital
    secagg_threshold: int = 0  # shares needed to reconstruct; 0 = two thirds of the shares (at least 2)
    secagg_max_weight: float = 2000.0  # >= the largest hospital's training images (larger costs precision)

    def __post_init__(self) -> None:
        require_choice("privacy.name", self.name, PRIVACY_MECHANISMS)
        for key in ("secagg_shares", "secagg_threshold"):
            if getattr(self, key) < 0:
                raise ConfigError(f"privacy.{key}={getattr(self, key)!r} is out of range; use 0 (auto) or more.")
        require_positive("privacy.secagg_max_weight", self.secagg_max_weight)


@dataclass
class DPConfig(PrivacyConfig):
    """Sample-level differential privacy at every hospital: Opacus DP-SGD (Poisson sampling, clipping, noise).

    ``target_epsilon`` is what one run may spend at each hospital; the noise multiplier is derived from it over the
    planned rounds and the hospital's data size. A hospital's own cap (``federation.site_*`` in simulation, its
    node config in deployment) can only make this stricter.
    """

    name: PrivacyMechanism = PrivacyMechanism.dp
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound
    max_noise_multiplier: float = 10.0  # a site refuses when fitting its cap would need more noise (useless updates)
    accountant: Accountant = Accountant.rdp  # Opacus' RDP accountant (the only one offered)
    max_physical_batch_size: int = 64  # Opacus BatchMemoryManager: the logical batch is train.batch_size
    # hooks | ghost (ghost clipping: no per-sample gradients in memory)
    grad_sample_mode: GradSampleMode = GradSampleMode.hooks
    secure_mode: bool = False  # cryptographically secure noise (torchcsprng); deployed sites: site secure_rng
    # every evaluation a hospital answers is a Gaussian release of noised sufficient statistics, charged to its
    # ledger; its noise is set so that the run's evaluations (rounds 0..train.rounds and the two calibration
    # stages), composed on their own, would spend eval_share x target_epsilon (a site's min_noise may raise it)
    eval_share: float = 0.25
    # research only: exact validation metrics, training loss and example counts, as before metering (no site with
    # require_dp ever releases them; a simulated hospital has no policy)
    exact_metrics: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("privacy.target_epsilon", self.target_epsilon)
        require_fraction("privacy.delta", self.delta, high_open=True)
        require_positive("privacy.max_grad_norm", self.max_grad_norm)
        require_positive("privacy.max_noise_multiplier", self.max_noise_multiplier)
        require_fraction("privacy.eval_share", self.eval_share, high_open=True)
        require_choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        if self.max_physical_batch_size < 1:
            raise ConfigError(
                f"privacy.max_physical_batch_size={self.max_physical_batch_size!r} is out of range; it must be >= 1."
            )
        require_choice("privacy.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)

    def require_runtime(self) -> None:
        """Fail before training when this machine cannot do what the config asks (secure RNG)."""
        import importlib.util

        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError(
                "privacy.secure_mode=true needs the torchcsprng package for cryptographically secure noise, and it "
                "is not installed (it has no wheel for this torch: build it from source, docs/operations.md 'A "
                "secure RNG for DP'). Install it, or set "
                "privacy.secure_mode=false for experiments (Opacus then warns that the RNG is not secure)."
            )


@dataclass
class CentralDPConfig(PrivacyConfig):
    """Client-level DP: each hospital's update is clipped at the hospital (Flower's ``fixedclipping_mod``) and the
    coordinator adds Gaussian noise to the sum (Flower's ``DifferentialPrivacyClientSideFixedClipping``), with
    Flower's RDP accountant reporting the run-level epsilon. Protects whole hospitals, trusts the coordinator with
    the noise."""

    name: PrivacyMechanism = PrivacyMechanism.central_dp
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # L2 bound on each hospital's model update
    delta: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("privacy.noise_multiplier", self.noise_multiplier)
        require_positive("privacy.clipping_norm", self.clipping_norm)
        if self.secure_aggregation:
            raise ConfigError(
                "privacy=central_dp cannot be combined with privacy.secure_aggregation=true (Flower's central-DP "
                "wrapper and SecAgg+ live in different workflows); use privacy=dp with secure aggregation instead."
            )
        require_fraction("privacy.delta", self.delta, high_open=True)
