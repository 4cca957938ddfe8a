"""A ``privacy=distributed_dp`` run's plan (issue 20): a function of the run config and the model's size only, so
the coordinator and every hospital compute the same one and no hospital takes the coordinator's word for it.

The plan holds the noise multiplier of the sum (the least with which ``train.rounds`` Skellam steps and the run's
metered evaluations spend at most ``privacy.target_epsilon``: :func:`medfed.common.accounting.epsilon_of`), the
power-of-two scale to integers (:func:`medfed.common.skellam.plan_scale`: the largest at which a hospital's noised
sum of up to ``privacy.max_site_images`` images stays in the SecAgg+ range), and the SecAgg+ integer range itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medfed.common.accounting import epsilon_of, release_noise_for
from medfed.common.config import Config, DistributedDPConfig
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded
from medfed.common.noise_search import least_noise
from medfed.common.skellam import IntegerTransport, plan_scale, rounded_sensitivity, share_variance

__all__ = ["DistributedPlan", "plan_distributed", "run_releases"]


@dataclass(frozen=True)
class DistributedPlan:
    """A run's distributed-DP plan: the same at the coordinator and at every hospital.

    ``noise_multiplier``: the standard deviation of the noise in the sum over one image's L2 sensitivity (integer
    units); ``honest``: hospitals certain to add their share to the sum (all but ``max_dropouts`` and
    ``max_colluding``)."""

    noise_multiplier: float
    scale: float
    sample_rate: float
    clip: float
    dim: int
    hospitals: int
    honest: int
    modulus_range: int
    rounds: int
    delta: float

    @property
    def transport(self) -> IntegerTransport:
        return IntegerTransport(self.hospitals, modulus_range=self.modulus_range)

    @property
    def sensitivity(self) -> tuple[float, float]:
        """One image's (L2, L1) sensitivity in integer units."""
        return rounded_sensitivity(self.clip, self.scale, self.dim)

    @property
    def variance(self) -> float:
        """Per-coordinate variance of the noise in the sum."""
        return (self.noise_multiplier * self.sensitivity[0]) ** 2

    @property
    def share_variance(self) -> float:
        return share_variance(self.variance, hospitals=self.hospitals, max_dropouts=self.hospitals - self.honest,
                              max_colluding=0)


def run_releases(cfg: Config, dp: DistributedDPConfig) -> dict[tuple[float, float], int]:
    """The run's metered releases as a hospital without a cap of its own reserves them at round 1, as Gaussian
    steps ``{(noise multiplier, 1.0): count}`` (none under ``privacy.exact_metrics``): an evaluation per round, the
    final stages, the training split's noised size (as :func:`medfed.client.dp_round.planned_evaluations`)."""
    if dp.exact_metrics:
        return {}
    finals = 2 if cfg.evaluate.final_stages else 0
    noise = release_noise_for(dp.target_epsilon * dp.eval_share, dp.delta, cfg.train.rounds + 1 + finals + 1)
    return {(noise, 1.0): cfg.train.rounds + finals + 1}


def plan_distributed(cfg: Config, dim: int) -> DistributedPlan:
    """The run's plan for a model of ``dim`` trainable weights.

    Raises:
        ConfigError: the trust assumptions leave no honest hospital, or the range fits no batch.
        PrivacyBudgetExceeded: the target needs a noise multiplier above ``privacy.max_noise_multiplier``.
    """
    dp = cfg.privacy
    if not isinstance(dp, DistributedDPConfig):
        raise ConfigError(f"a distributed-DP plan needs privacy=distributed_dp, not privacy={dp.name}.")
    hospitals = cfg.federation.hospitals
    honest = hospitals - dp.max_dropouts - dp.max_colluding
    share_variance(1.0, hospitals=hospitals, max_dropouts=dp.max_dropouts, max_colluding=dp.max_colluding)
    transport = IntegerTransport(hospitals, modulus_range=2 ** dp.modulus_bits)
    releases = run_releases(cfg, dp)
    rounds = cfg.train.rounds

    def noise(scale: float) -> float:
        l2, l1 = rounded_sensitivity(dp.max_grad_norm, scale, dim)

        def eps(z: float) -> float:
            return epsilon_of(releases, {(z, dp.sample_rate, l2, l1): rounds}, dp.delta)

        return least_noise(eps, dp.target_epsilon, dp.max_noise_multiplier)

    def scale_for(z: float) -> float:
        return plan_scale(clip=dp.max_grad_norm, dim=dim, noise=z, honest=honest, max_batch=dp.max_site_images,
                          transport=transport)

    z = noise(2.0 ** 20)  # at a fine scale the rounding costs nothing: the Gaussian-like answer
    if not math.isfinite(z):
        raise PrivacyBudgetExceeded(
            f"Privacy target out of reach: {rounds} rounds of distributed DP (sampling rate {dp.sample_rate:g}) and "
            f"the run's noised evaluations within target_epsilon {dp.target_epsilon:g} (delta {dp.delta:g}) would "
            f"need a noise multiplier above privacy.max_noise_multiplier={dp.max_noise_multiplier:g}. Raise "
            "privacy.target_epsilon, or train fewer rounds.")
    scale = scale_for(z)
    z = noise(scale)
    while scale > 1 and scale_for(z) < scale:  # (the coarser rounding needed a little more noise)
        scale /= 2
        z = noise(scale)
    return DistributedPlan(z, scale, dp.sample_rate, dp.max_grad_norm, dim, hospitals, honest, transport.modulus_range,
                           rounds, dp.delta)
