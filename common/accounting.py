"""The privacy accountant every ledger and plan uses: Renyi DP of Gaussian and Skellam steps, composed and
converted to ``(epsilon, delta)`` by Opacus' conversion.

Gaussian steps (DP-SGD rounds, noised releases) are costed by Opacus' RDP of the subsampled Gaussian; distributed-DP
rounds by the Skellam bound (:mod:`medfed.common.skellam`). A composition of Gaussian steps alone is evaluated at
Opacus' default orders (as ``privacy=dp`` always has been); one that holds a Skellam step at the integer orders where
the Skellam bound holds, each step's RDP added order by order and converted once. The hospital's ledger
(:func:`medfed.client.privacy.epsilon_spent`) and the distributed-DP run plan
(:mod:`medfed.common.distributed_plan`), which the coordinator computes too, both count here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from medfed.common.noise_search import least_noise
from medfed.common.skellam import ORDERS, SkellamStep, epsilon_from_rdp

__all__ = ["MAX_NOISE", "epsilon_of", "release_noise_for"]

MAX_NOISE = 1e4
"""The largest noise multiplier medfed ever plans."""


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of one subsampled Gaussian step at its default orders (~0.1 s each, so kept per process)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    return tuple(float(x) for x in rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                    orders=orders))


@functools.lru_cache(maxsize=4096)
def _rdp_at_integer_orders(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus' RDP of one subsampled Gaussian step at the integer orders the Skellam bound holds for."""
    from opacus.accountants.analysis import rdp

    return tuple(float(x) for x in rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                    orders=list(ORDERS)))


def epsilon_of(gaussian: Mapping[tuple[float, float], int], skellam: Mapping[tuple[float, float, float, float], int],
               delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian steps (``(noise multiplier, sampling rate) -> steps``) and Skellam steps
    (``(noise multiplier, sampling rate, l2, l1) -> steps``: noise of standard deviation ``noise * l2`` in integer
    units, one image's L2 and L1 sensitivities ``l2`` and ``l1``), all composed. Zero noise costs ``inf``."""
    if not gaussian and not skellam:
        return 0.0
    if any(key[0] <= 0 for key in [*gaussian, *skellam]):  # pragma: no mutate (<= or <: zero noise is inf too)
        return math.inf
    if skellam:
        curve = np.zeros(len(ORDERS))
        for (sigma, q), n in gaussian.items():
            curve += np.asarray(_rdp_at_integer_orders(sigma, q)) * n
        for (z, q, l2, l1), n in skellam.items():
            step = SkellamStep((z * l2) ** 2, l2, l1, q, n)
            curve += np.asarray([step.rdp(order) for order in ORDERS])
        return epsilon_from_rdp(ORDERS, curve, delta)
    from opacus.accountants import RDPAccountant

    total = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
    for (sigma, q), n in gaussian.items():
        total += np.asarray(_rdp_per_step(sigma, q)) * n
    return epsilon_from_rdp(RDPAccountant.DEFAULT_ALPHAS, total, delta)


@functools.lru_cache(maxsize=256)
def release_noise_for(epsilon: float, delta: float, releases: int) -> float:
    """The least noise multiplier (to 0.1 %) with which ``releases`` Gaussian releases (sampling rate 1), composed
    on their own, spend at most ``epsilon`` at ``delta``; data-independent, so every site of a run finds the same."""
    def eps(sigma: float) -> float:
        return epsilon_of({(sigma, 1.0): max(1, releases)}, {}, delta)

    return min(least_noise(eps, epsilon, MAX_NOISE), MAX_NOISE)
