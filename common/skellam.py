"""The distributed Skellam mechanism's arithmetic (issue 20): accounting, noise shares, integer encoding.

Under distributed DP every participating hospital clips its per-sample gradients, scales them to integers, sums
them, adds a *share* of integer noise and sends the result through Flower's SecAgg+, which reveals only the sum over
hospitals. Skellam noise, ``Poisson(mu / 2) - Poisson(mu / 2)`` (variance ``mu``), is closed under summation: the
shares of ``k`` hospitals, each of variance ``mu / k``, sum to Skellam noise of variance ``mu`` exactly. That is why
this project takes Skellam over the distributed discrete Gaussian, whose sum is only close to a discrete Gaussian
(Kairouz, Liu and Steinke, ICML 2021) and whose sampler is not in numpy.

What this module does, each part testable alone (the round that uses it is built on top):

- :func:`skellam_rdp`: Renyi DP of the multidimensional Skellam mechanism, Agarwal, Kairouz and Liu, "The Skellam
  Mechanism for Differentially Private Federated Learning" (NeurIPS 2021), Theorem 3.5, for integer orders:
  ``eps(a) <= a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))`` with ``D1``, ``D2`` the
  query's L1 and L2 sensitivities and ``mu`` the per-coordinate variance. Its first term is the Gaussian
  mechanism's; the minimum is what discreteness costs, and vanishes as ``mu`` grows.
- :func:`subsampled_rdp`: Poisson subsampling of any mechanism, Zhu and Wang, "Poisson Subsampled Renyi
  Differential Privacy" (ICML 2019), Theorem 5 (the general upper bound; at order 2 it is exact for the Gaussian).
- :func:`skellam_epsilon`: steps composed (RDP adds) and converted to ``(epsilon, delta)`` by Opacus' conversion,
  the one ``privacy=dp``'s ledger uses, so the two kinds of entry compose on one ledger.
- :func:`rounded_sensitivity`: each per-sample gradient, clipped to ``clip`` and multiplied by ``scale``, is rounded
  to integers on its own before the sum, so one image moves the site's integer sum by at most
  ``clip * scale + sqrt(dim) / 2`` in L2 (nearest-integer rounding moves each coordinate by at most 1/2) and at most
  ``sqrt(dim)`` times that in L1, deterministically.
- :func:`share_variance`: the noise each hospital adds so that the sum still carries the whole of it when up to
  ``max_dropouts`` hospitals are missing from the round and up to ``max_colluding`` hand their shares to the
  coordinator: ``mu / (hospitals - max_dropouts - max_colluding)``; refused when no honest hospital would be left.
- :func:`skellam_share`: one hospital's share, drawn from numpy's Poisson sampler with a generator the caller owns.
- :func:`noise_for_target` and :func:`plan_scale`: the least noise multiplier (noise standard deviation in the
  sum over the L2 sensitivity) with which a hospital's planned steps spend at most a target, and the largest
  power-of-two scale at which its noised integer sum stays inside the transport's range.
- :class:`IntegerTransport`: how the integers ride Flower's SecAgg+ unchanged. Its client mod quantises floats
  ``x`` to ``round_stochastic((clip(x, -c, c) + c) * R / (2c))`` and the workflow hands the strategy the mean over
  the active hospitals of ``dequantize(sum) + offset``. With ``c = R / 2`` (a power of two) an integer ``v`` in
  ``[-R/2, R/2]`` sent as the float ``v`` quantises to exactly ``v + R/2`` (no rounding happens), the masked sum
  of ``n`` hospitals stays below the modulus when ``n * R`` does, so it never wraps, and ``n`` times the mean the
  coordinator receives is exactly the integer sum. A hospital must report ``num_examples == max_weight`` so that
  the mod's weighting ratio is 1. Values outside the range would be clipped by Flower silently: the site counts
  them (:meth:`IntegerTransport.encode`) and the range is chosen so that they are rare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from medfed.common.errors import ConfigError

__all__ = [
    "ORDERS",
    "IntegerTransport",
    "PoissonSource",
    "SkellamStep",
    "epsilon_from_rdp",
    "noise_for_target",
    "plan_scale",
    "rounded_sensitivity",
    "share_variance",
    "skellam_epsilon",
    "skellam_rdp",
    "skellam_share",
    "subsampled_rdp",
]

ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 128, 192, 256)
"""Integer Renyi orders (both bounds above hold for integer orders only)."""


def skellam_rdp(order: int, *, variance: float, l2: float, l1: float) -> float:
    """Renyi DP at integer ``order`` of adding Skellam noise of per-coordinate ``variance`` to an integer-valued
    query of L2 sensitivity ``l2`` and L1 sensitivity ``l1`` (Agarwal, Kairouz and Liu 2021, Theorem 3.5)."""
    if order < 2 or order != int(order):
        raise ValueError(f"the Skellam bound holds for integer orders >= 2, not {order!r}.")
    if variance <= 0:
        return math.inf
    a = float(order)
    gaussian = a * l2 * l2 / (2.0 * variance)
    discrete = min(((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * variance * variance), 3.0 * l1 / (2.0 * variance))
    return gaussian + discrete


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def subsampled_rdp(order: int, rate: float, rdp: Callable[[int], float]) -> float:
    """Renyi DP at integer ``order`` of a mechanism of RDP ``rdp`` run on a Poisson sample of rate ``rate``
    (Zhu and Wang 2019, Theorem 5); never more than the mechanism's own ``rdp(order)``."""
    if order < 2 or order != int(order):
        raise ValueError(f"the subsampling bound holds for integer orders >= 2, not {order!r}.")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"a sampling rate lies in (0, 1], not {rate!r}.")
    alone = rdp(order)
    if rate == 1.0 or not math.isfinite(alone):
        return alone
    a, q = int(order), rate
    # log of each term of the bound's sum, and its coefficient: order 0/1 together, order 2, then 3..a (times 3)
    logs = [(a - 1) * math.log1p(-q) + math.log(a * q - q + 1.0),
            _log_comb(a, 2) + 2.0 * math.log(q) + (a - 2) * math.log1p(-q) + rdp(2)]
    logs += [math.log(3.0) + _log_comb(a, j) + j * math.log(q) + (a - j) * math.log1p(-q) + (j - 1) * rdp(j)
             for j in range(3, a + 1)]
    top = max(logs)
    bound = (top + math.log(sum(math.exp(x - top) for x in logs))) / (a - 1)
    return min(bound, alone)


@dataclass(frozen=True)
class SkellamStep:
    """One DP step of distributed Skellam noise: what the accountant needs.

    ``variance``: the per-coordinate variance of the noise in the *sum* (integer units) that protects this
    hospital's images under the run's trust assumption; ``l2``/``l1``: one image's sensitivities in the same units
    (:func:`rounded_sensitivity`); ``sample_rate``: the hospital's Poisson sampling rate."""

    variance: float
    l2: float
    l1: float
    sample_rate: float
    steps: int = 1

    def rdp(self, order: int) -> float:
        def one(alpha: int) -> float:
            return skellam_rdp(alpha, variance=self.variance, l2=self.l2, l1=self.l1)

        return self.steps * subsampled_rdp(order, self.sample_rate, one)


def skellam_epsilon(steps: Sequence[SkellamStep], delta: float) -> float:
    """Epsilon at ``delta`` of these steps composed (their RDP adds, order by order), by Opacus' conversion."""
    if not steps:
        return 0.0
    return epsilon_from_rdp(ORDERS, [sum(step.rdp(order) for step in steps) for order in ORDERS], delta)


def epsilon_from_rdp(orders: Sequence[float], rdp_values: Sequence[float] | np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve by Opacus' conversion (the one every ledger uses): the least over the
    orders, an infinite order never chosen; ``inf`` when the conversion gives NaN (a NaN never counts as "fits")."""
    values = np.asarray(rdp_values, dtype=np.float64)
    from opacus.accountants.analysis import rdp

    eps, _ = rdp.get_privacy_spent(orders=list(orders), rdp=values, delta=delta)
    return math.inf if math.isnan(eps) else float(eps)


def rounded_sensitivity(clip: float, scale: float, dim: int) -> tuple[float, float]:
    """(L2, L1) sensitivity of a sum of per-sample gradients each clipped to L2 norm ``clip``, multiplied by
    ``scale`` and rounded to the nearest integers on its own (``dim`` coordinates)."""
    if clip <= 0 or scale <= 0 or dim < 1:
        raise ValueError(f"clip ({clip!r}) and scale ({scale!r}) must be positive and dim ({dim!r}) at least 1.")
    l2 = clip * scale + math.sqrt(dim) / 2.0
    return l2, math.sqrt(dim) * l2


def noise_for_target(target: float, delta: float, *, sample_rate: float, steps: int, clip: float, scale: float,
                     dim: int, ceiling: float = 1e3) -> float:
    """The least noise multiplier ``z`` (to 0.1 %; ``inf`` above ``ceiling``) with which ``steps`` Skellam steps
    of variance ``(z * l2) ** 2`` in the sum, at this sampling rate, spend at most ``target`` epsilon at ``delta``
    (``l2``, ``l1``: :func:`rounded_sensitivity` of ``clip``, ``scale`` and ``dim``)."""
    from medfed.common.noise_search import least_noise as _least_noise

    l2, l1 = rounded_sensitivity(clip, scale, dim)

    def eps(z: float) -> float:
        return skellam_epsilon([SkellamStep((z * l2) ** 2, l2, l1, sample_rate, steps)], delta)

    return _least_noise(eps, target, ceiling)


def plan_scale(*, clip: float, dim: int, noise: float, honest: int, max_batch: int, transport: IntegerTransport,
               tails: float = 8.0) -> float:
    """The largest power-of-two scale at which one hospital's integer sum stays inside the transport's range:
    ``max_batch`` images each adding at most ``clip * scale + 1/2`` to a coordinate, plus its noise share (standard
    deviation ``noise * l2 / sqrt(honest)``) out to ``tails`` standard deviations.

    Raises:
        ConfigError: not even a scale of 1 fits (a batch too large for the range).
    """
    def fits(scale: float) -> bool:
        l2, _ = rounded_sensitivity(clip, scale, dim)
        spread = max_batch * (clip * scale + 0.5) + tails * noise * l2 / math.sqrt(honest)
        return spread <= transport.bound

    if not fits(1.0):
        raise ConfigError(
            f"A batch of up to {max_batch} images with clip {clip:g} and noise multiplier {noise:g} does not fit the "
            f"SecAgg+ integer range of +-{transport.bound} at any scale; lower train.batch_size or the noise, or use "
            "fewer hospitals per sum.")
    scale = 1.0
    while fits(scale * 2):
        scale *= 2
    return scale


def share_variance(variance: float, *, hospitals: int, max_dropouts: int, max_colluding: int) -> float:
    """The variance each hospital adds so that the hospitals certain to be in the sum and honest (all but
    ``max_dropouts`` missing and ``max_colluding`` sharing their noise with the coordinator) still add ``variance``.

    Raises:
        ConfigError: the assumptions leave no honest hospital in the sum.
    """
    if min(max_dropouts, max_colluding) < 0:
        raise ConfigError(f"privacy.max_dropouts ({max_dropouts}) and privacy.max_colluding ({max_colluding}) "
                          "must be 0 or more.")
    honest = hospitals - max_dropouts - max_colluding
    if honest < 1:
        raise ConfigError(
            f"With {hospitals} hospitals, privacy.max_dropouts={max_dropouts} and privacy.max_colluding="
            f"{max_colluding} leave no hospital certain to add honest noise to the sum; their total must be at most "
            f"{hospitals - 1}. Lower one of them (or add hospitals).")
    return variance / honest


class PoissonSource(Protocol):
    """Where Poisson variates come from: numpy's ``Generator`` or :class:`medfed.client.secure_random.SecureRandom`
    (the operating system's CSPRNG, which every distributed-DP round uses)."""

    def poisson(self, lam: float, size: tuple[int, ...]) -> Any: ...


def skellam_share(shape: tuple[int, ...], variance: float, rng: PoissonSource) -> np.ndarray:
    """Integer Skellam noise of per-coordinate ``variance``: ``Poisson(variance / 2) - Poisson(variance / 2)``."""
    if variance < 0 or not math.isfinite(variance):
        raise ValueError(f"a noise variance is finite and >= 0, not {variance!r}.")
    half = variance / 2.0
    return rng.poisson(half, size=shape).astype(np.int64) - rng.poisson(half, size=shape).astype(np.int64)


_INT32_TOP = 2**30  # Flower's stochastic rounding casts to int32: a quantised value R must stay below 2**31


@dataclass(frozen=True)
class IntegerTransport:
    """SecAgg+ settings that carry integers in ``[-quantization_range / 2, quantization_range / 2]`` exactly."""

    hospitals: int
    modulus_range: int = 2**32

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ValueError(f"a sum needs at least one hospital, not {self.hospitals!r}.")
        if self.modulus_range & (self.modulus_range - 1) or self.modulus_range > 2**32:
            raise ValueError(f"Flower's SecAgg+ modulus is a power of two up to 2**32, not {self.modulus_range!r}.")
        if self.quantization_range < 2:
            raise ConfigError(f"{self.hospitals} hospitals leave no integer range below the SecAgg+ modulus "
                              f"{self.modulus_range}; use fewer hospitals per sum.")

    @property
    def quantization_range(self) -> int:
        """The largest power of two ``R`` with ``hospitals * R`` below the modulus (and ``R`` within int32)."""
        top = (self.modulus_range - 1) // self.hospitals
        return min(1 << (top.bit_length() - 1), _INT32_TOP) if top >= 1 else 0

    @property
    def clipping_range(self) -> float:
        return float(self.quantization_range // 2)

    @property
    def bound(self) -> int:
        """The largest magnitude an integer may have to travel unchanged."""
        return self.quantization_range // 2

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(the floats to hand the SecAgg+ mod, how many values lay outside the range and were clipped)."""
        given = np.asarray(values)
        if given.dtype.kind not in "iu":
            raise TypeError(f"the transport carries integers, not {given.dtype}.")
        ints = given.astype(np.int64)
        overflow = int(np.count_nonzero(np.abs(ints) > self.bound))
        return np.clip(ints, -self.bound, self.bound).astype(np.float64), overflow

    def decode(self, mean: np.ndarray, active: int) -> np.ndarray:
        """The integer sum over the ``active`` hospitals of what they encoded, from the mean the coordinator gets."""
        if not 1 <= active <= self.hospitals:
            raise ValueError(f"{active} active hospitals, of {self.hospitals}.")
        return np.rint(np.asarray(mean, dtype=np.float64) * active).astype(np.int64)
