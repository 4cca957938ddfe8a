"""Schemas of the ``privacy`` group: none, sample-level DP-SGD (``dp``), client-level DP (``central_dp``) and
sample-level DP with the noise shared among the hospitals under SecAgg+ (``distributed_dp``)."""

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
    "DistributedDPConfig",
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


@dataclass
class DistributedDPConfig(DPConfig):
    """Sample-level DP whose noise the hospitals add together: each round every hospital sums its clipped per-sample
    gradients as integers, adds a share of Skellam noise and sends the result through Flower's SecAgg+; the sum
    carries the whole noise, and the coordinator takes one SGD step with it (DP-FedSGD; README, "Distributed DP").

    The noise in the sum is planned for ``target_epsilon`` over ``train.rounds`` steps at Poisson rate
    ``sample_rate`` (the same at every hospital, so the sum samples the union of the data as one pooled DP-SGD run
    would), and each hospital's share is sized for the worst case the run allows: ``max_dropouts`` hospitals
    missing from a round's sum and ``max_colluding`` handing their shares to the coordinator. A round with more
    hospitals missing is discarded. Evaluations are metered as under ``privacy=dp`` (``eval_share``).
    """

    name: PrivacyMechanism = PrivacyMechanism.distributed_dp
    secure_aggregation: bool = True  # always: the coordinator must see the sum only
    sample_rate: float = 1.0  # each hospital's Poisson sampling rate per round (1: every training image, DP-GD)
    max_dropouts: int = 0  # hospitals that may be missing from a round's sum with the round still applied
    max_colluding: int = 0  # hospitals that may hand their noise shares to the coordinator
    modulus_bits: int = 32  # SecAgg+'s modulus is 2**modulus_bits (Flower's default: 32)
    max_site_images: int = 10000  # the most images one hospital sums in a round; sizes the integer scale
    # the noise in the sum is measured against all hospitals' gradients together, so a multiplier far above
    # privacy=dp's still trains; the plan refuses above this
    max_noise_multiplier: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.secure_aggregation:
            raise ConfigError("privacy=distributed_dp needs privacy.secure_aggregation=true: each hospital adds only "
                              "a share of the noise, so the coordinator may see the sum only. Leave it true, or use "
                              "privacy=dp (each hospital adds all its noise).")
        require_fraction("privacy.sample_rate", self.sample_rate, low_open=True)
        for key in ("max_dropouts", "max_colluding"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"privacy.{key}={value!r} is out of range; it is a number of hospitals, 0 or more.")
        if not 2 <= self.modulus_bits <= 32:
            raise ConfigError(f"privacy.modulus_bits={self.modulus_bits!r} is out of range; Flower's SecAgg+ "
                              "modulus is 2**bits with bits in 2..32.")
        if self.max_site_images < 1:
            raise ConfigError(f"privacy.max_site_images={self.max_site_images!r} is out of range; it must be >= 1.")
