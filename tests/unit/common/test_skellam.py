"""The distributed Skellam mechanism's arithmetic (common/skellam.py, issue 20): the paper's bound at hand-computed
values, Poisson subsampling against Opacus' exact sampled Gaussian, composition, noise shares and their variance,
and the sensitivity of rounded per-sample gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medfed.common.skellam import (
    ORDERS,
    SkellamStep,
    rounded_sensitivity,
    share_variance,
    skellam_epsilon,
    skellam_rdp,
    skellam_share,
    subsampled_rdp,
)
from medfed.common.errors import ConfigError


@pytest.mark.parametrize(("order", "variance", "l2", "l1", "expected"), [
    # a D2^2/(2 mu) + min(((2a-1) D2^2 + 6 D1)/(4 mu^2), 3 D1/(2 mu)), worked by hand:
    (2, 100.0, 10.0, 30.0, 1.0 + 480.0 / 40_000.0),  # 1 + min(0.012, 0.45)
    (10, 1e4, 100.0, 1000.0, 5.0 + 196_000.0 / 4e8),  # 5 + min(0.00049, 0.15)
    (2, 1.0, 1.0, 1.0, 1.0 + 1.5),  # 1 + min(2.25, 1.5): the second branch of the minimum
    (3, 4.0, 2.0, 2.0, 1.5 + 0.5),  # 3*4/8 + min((5*4 + 12)/64 = 0.5, 6/8 = 0.75)
    (2, 0.5, 1.0, 1.0, 2.0 + 3.0),  # 2/1 + min((3 + 6)/1 = 9, 3/1 = 3): the second branch, at variance != 1
])
def test_the_skellam_bound_at_hand_computed_values(order, variance, l2, l1, expected):
    assert skellam_rdp(order, variance=variance, l2=l2, l1=l1) == pytest.approx(expected, rel=1e-12)


def test_the_skellam_bound_tends_to_the_gaussians_and_refuses_what_it_does_not_cover():
    # the discreteness term vanishes as the variance grows: a / (2 z^2) with z = sqrt(mu) / D2
    for order in (2, 8, 32):
        assert skellam_rdp(order, variance=1e8, l2=1e4, l1=1e5) == pytest.approx(order / 2.0, rel=1e-4)  # z = 1
    assert skellam_rdp(2, variance=0.0, l2=1.0, l1=1.0) == math.inf
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="integer orders"):
            skellam_rdp(bad, variance=1.0, l2=1.0, l1=1.0)


@pytest.mark.parametrize(("rate", "sigma"), [(0.01, 1.0), (0.1, 0.8), (0.3, 2.0), (0.9, 5.0)])
def test_subsampling_is_exact_at_order_2_and_never_below_the_exact_sampled_gaussian(rate, sigma):
    from opacus.accountants.analysis.rdp import _compute_rdp

    def gaussian(order: int) -> float:
        return order / (2.0 * sigma * sigma)

    # order 2 by hand: log(1 - q^2 + q^2 e^{eps(2)}), Mironov et al.'s sampled Gaussian at order 2
    by_hand = math.log1p(rate * rate * math.expm1(1.0 / sigma ** 2))
    assert subsampled_rdp(2, rate, gaussian) == pytest.approx(by_hand, rel=1e-9)
    assert _compute_rdp(rate, sigma, 2) == pytest.approx(by_hand, rel=1e-9)
    for order in range(3, 65):
        bound = subsampled_rdp(order, rate, gaussian)
        assert _compute_rdp(rate, sigma, order) <= bound * (1 + 1e-9)
        assert bound <= gaussian(order) * (1 + 1e-12)  # never worse than not sampling at all


def test_subsampling_at_order_3_by_hand():
    # Zhu and Wang's Theorem 5 at a = 3, q = 0.1, for eps(a) = a / 2 (a Gaussian of noise 1):
    # (1/2) log((1-q)^2 (3q - q + 1) + 3 q^2 (1-q) e^{eps(2)} + 3 q^3 e^{2 eps(3)}), worked out: 0.0502167982...
    assert subsampled_rdp(3, 0.1, lambda a: a / 2.0) == pytest.approx(0.050216798212001076, rel=1e-12)


def test_subsampling_at_order_4_by_hand():
    # as above at a = 4: (1/3) log((1-q)^3 (4q - q + 1) + 6 q^2 (1-q)^2 e^1 + 3*4 q^3 (1-q) e^3 + 3 q^4 e^6)
    assert subsampled_rdp(4, 0.1, lambda a: a / 2.0) == pytest.approx(0.11635960662585916, rel=1e-12)


def test_subsampling_at_rate_1_is_the_mechanism_itself_and_rates_outside_are_refused():
    def rdp(order: int) -> float:
        return 0.3 * order

    assert subsampled_rdp(7, 1.0, rdp) == 0.3 * 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sampling rate"):
            subsampled_rdp(2, bad, rdp)
    with pytest.raises(ValueError, match="integer orders"):
        subsampled_rdp(1, 0.5, rdp)


def test_skellam_epsilon_is_the_gaussians_at_large_variance_and_composes_by_steps():
    from opacus.accountants.analysis import rdp

    z, rate, steps, scale = 1.1, 0.05, 200, 1e4  # noise multiplier, sampling rate, steps, integers per unit
    l2, l1 = rounded_sensitivity(1.0, scale, 100)
    step = SkellamStep(variance=(z * l2) ** 2, l2=l2, l1=l1, sample_rate=rate, steps=steps)
    gaussian = rdp.compute_rdp(q=rate, noise_multiplier=z, steps=steps, orders=list(ORDERS))
    reference, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=gaussian, delta=1e-5)

    eps = skellam_epsilon([step], 1e-5)

    # the general subsampling bound is looser than the exact sampled Gaussian's (here about 23 % more epsilon);
    # without subsampling only discreteness separates them, and at this scale that is nothing
    assert reference < eps <= reference * 1.3
    full = SkellamStep(variance=(z * l2) ** 2, l2=l2, l1=l1, sample_rate=1.0, steps=steps)
    unsampled, _ = rdp.get_privacy_spent(
        orders=list(ORDERS), rdp=rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=steps, orders=list(ORDERS)),
        delta=1e-5)
    assert skellam_epsilon([full], 1e-5) == pytest.approx(unsampled, rel=1e-3)
    halves = [SkellamStep(step.variance, l2, l1, rate, steps // 2)] * 2
    assert skellam_epsilon(halves, 1e-5) == pytest.approx(eps, rel=1e-12)
    more_noise = SkellamStep(4 * step.variance, l2, l1, rate, steps)
    assert skellam_epsilon([more_noise], 1e-5) < eps
    assert skellam_epsilon([], 1e-5) == 0.0
    assert skellam_epsilon([SkellamStep(0.0, l2, l1, rate)], 1e-5) == math.inf


def test_shares_are_sized_for_the_worst_case_the_run_allows():
    assert share_variance(300.0, hospitals=5, max_dropouts=1, max_colluding=1) == pytest.approx(100.0)
    assert share_variance(300.0, hospitals=5, max_dropouts=0, max_colluding=0) == pytest.approx(60.0)
    with pytest.raises(ConfigError, match=r"max_dropouts=2 and privacy.max_colluding=1 .* at most 2"):
        share_variance(1.0, hospitals=3, max_dropouts=2, max_colluding=1)
    with pytest.raises(ConfigError, match=r"must be 0 or more\.$"):
        share_variance(1.0, hospitals=3, max_dropouts=-1, max_colluding=0)
    assert share_variance(7.0, hospitals=3, max_dropouts=1, max_colluding=1) == 7.0  # one honest: it adds it all


def test_the_sum_of_the_shares_has_the_planned_variance():
    rng = np.random.default_rng(0)
    planned, hospitals = 250.0, 5
    share = share_variance(planned, hospitals=hospitals, max_dropouts=0, max_colluding=0)

    total = sum(skellam_share((200_000,), share, rng) for _ in range(hospitals))

    assert total.dtype == np.int64
    assert total.var() == pytest.approx(planned, rel=0.02)
    assert abs(total.mean()) < 5 * math.sqrt(planned / 200_000)
    assert not skellam_share((3,), 0.0, rng).any()
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError, match="variance"):
            skellam_share((3,), bad, rng)


def test_one_image_moves_the_rounded_integer_sum_by_at_most_the_sensitivity():
    rng = np.random.default_rng(1)
    clip, scale, dim = 1.0, 8.0, 50  # a small scale, so that rounding matters
    l2, l1 = rounded_sensitivity(clip, scale, dim)
    worst2 = worst1 = 0.0
    for _ in range(200):
        grads = rng.normal(size=(6, dim)) * rng.uniform(0.01, 3.0, size=(6, 1))
        clipped = grads / np.maximum(1.0, np.linalg.norm(grads, axis=1, keepdims=True) / clip)
        rounded = np.rint(clipped * scale)
        with_it, without = rounded.sum(axis=0), rounded[1:].sum(axis=0)
        worst2 = max(worst2, float(np.linalg.norm(with_it - without)))
        worst1 = max(worst1, float(np.abs(with_it - without).sum()))
    assert clip * scale < worst2 <= l2
    assert worst1 <= l1
    assert rounded_sensitivity(1.0, 8.0, 16) == (8.0 + 2.0, 4 * 10.0)  # clip*scale + sqrt(dim)/2; sqrt(dim) x that
    assert rounded_sensitivity(0.5, 2.0, 1) == (1.5, 1.5)
    for clip, scale, dim in ((0.0, 1.0, 3), (1.0, 0.0, 3), (1.0, 1.0, 0)):
        with pytest.raises(ValueError, match="positive"):
            rounded_sensitivity(clip, scale, dim)


def test_the_integer_transport_fits_the_sum_below_flowers_modulus():
    from medfed.common.skellam import IntegerTransport

    five = IntegerTransport(5)
    assert five.quantization_range == 2**29 and five.clipping_range == 2.0**28 and five.bound == 2**28
    assert 5 * five.quantization_range < 2**32
    assert IntegerTransport(1).quantization_range == 2**30  # Flower's int32 cast, not the modulus, limits one
    assert IntegerTransport(8).quantization_range == 2**28  # 8 * 2**29 would reach the modulus itself
    assert IntegerTransport(3, modulus_range=2**16).quantization_range == 2**14
    with pytest.raises(ValueError, match="power of two"):
        IntegerTransport(3, modulus_range=3 * 2**20)
    with pytest.raises(ConfigError, match="fewer hospitals"):
        IntegerTransport(2**15, modulus_range=2**16)
    with pytest.raises(ValueError, match="up to 2\\*\\*32"):
        IntegerTransport(3, modulus_range=2**33)
    with pytest.raises(ValueError, match="at least one hospital, not 0"):
        IntegerTransport(0)
    assert IntegerTransport(1, modulus_range=4).quantization_range == 2  # the smallest range there is


def test_the_transport_counts_what_it_clips_and_decodes_the_sum():
    from medfed.common.skellam import IntegerTransport

    transport = IntegerTransport(3, modulus_range=2**12)  # R = 2**10: integers within +-512
    floats, overflow = transport.encode(np.array([-600, -512, 0, 511, 512, 513, 9000]))
    assert floats.tolist() == [-512.0, -512.0, 0.0, 511.0, 512.0, 512.0, 512.0]
    assert overflow == 3
    assert transport.decode(np.array([1 / 3, -2 / 3, 1000 / 3]), 3).tolist() == [1, -2, 1000]
    with pytest.raises(TypeError, match="integers"):
        transport.encode(np.array([0.5]))
    with pytest.raises(ValueError, match="active"):
        transport.decode(np.array([0.0]), 4)
    assert transport.decode(np.array([-3.0]), 1).tolist() == [-3]  # one hospital left in the sum


def test_the_noise_for_a_target_is_the_least_that_fits():
    from medfed.common.skellam import noise_for_target

    plan = {"sample_rate": 0.1, "steps": 50, "clip": 1.0, "scale": 2.0**16, "dim": 1000}
    z = noise_for_target(3.0, 1e-5, **plan)
    l2, l1 = rounded_sensitivity(1.0, 2.0**16, 1000)

    def eps(noise: float) -> float:
        return skellam_epsilon([SkellamStep((noise * l2) ** 2, l2, l1, 0.1, 50)], 1e-5)

    assert eps(z) <= 3.0 < eps(z * 0.999)
    assert noise_for_target(1.0, 1e-5, **plan) > z  # a smaller target needs more noise
    assert noise_for_target(3.0, 1e-5, **plan, ceiling=0.5) == math.inf


def test_the_scale_is_the_largest_power_of_two_whose_sums_stay_in_range():
    from medfed.common.skellam import IntegerTransport, plan_scale

    transport = IntegerTransport(5)  # +-2**28
    plan = {"clip": 1.0, "dim": 50_000, "noise": 1.2, "honest": 3, "max_batch": 120, "transport": transport}

    scale = plan_scale(**plan)

    def spread(s: float) -> float:
        return 120 * (s + 0.5) + 8 * 1.2 * rounded_sensitivity(1.0, s, 50_000)[0] / math.sqrt(3)

    assert math.log2(scale).is_integer() and scale >= 2**20  # rounding (sqrt(dim)/2 ~ 112) is then ~0.01 %
    assert spread(scale) <= transport.bound < spread(2 * scale)
    refusal = r"does not fit the SecAgg\+ integer range .* or use fewer hospitals per sum\.$"
    with pytest.raises(ConfigError, match=refusal):
        plan_scale(**{**plan, "transport": IntegerTransport(3, modulus_range=2**8)})
    # where the noise dominates the spread, the scale follows it: 8 x 100 x l2 / sqrt(3) ~ 462 x scale
    loud = plan_scale(**{**plan, "noise": 100.0})
    assert 2**18 == loud and 120 * (loud + 0.5) + 8 * 100 * rounded_sensitivity(1.0, loud, 50_000)[0] / math.sqrt(3) \
        <= transport.bound
    # a range that just holds a scale of 1 (16 images of clip 1 and no noise: 16 x 1.5 = 24 <= 32) gets 1
    small = IntegerTransport(3, modulus_range=2**8)
    assert plan_scale(clip=1.0, dim=4, noise=0.0, honest=1, max_batch=16, transport=small) == 1.0
