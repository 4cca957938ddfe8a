"""Poisson variates from the operating system's CSPRNG (distributed DP's noise shares and sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medfed.client.secure_random import SecureRandom
from medfed.common.skellam import skellam_share
from scipy import stats


def test_uniforms_lie_in_the_unit_interval_and_are_never_repeated():
    u = SecureRandom().random(100_000)

    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert len(np.unique(u)) == len(u)  # 53 random bits each
    assert not np.array_equal(SecureRandom().random(8), SecureRandom().random(8))  # no seed to share


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.99, 10.0, 37.5, 1e4])  # both algorithms and the switch between them
def test_poisson_variates_follow_the_poisson_law(lam):
    draws = SecureRandom().poisson(lam, (400, 100))
    assert draws.shape == (400, 100) and draws.dtype == np.int64

    # chi-square against the pmf over the bins holding ~99.99 % of the mass (the tails pooled into the end bins)
    low, high = int(stats.poisson.ppf(1e-4, lam)), int(stats.poisson.ppf(1 - 1e-4, lam))
    edges = np.linspace(low, high + 1, min(high - low + 2, 40)).astype(int)
    edges = np.unique(edges)
    observed = np.histogram(np.clip(draws, low, high), bins=edges)[0]
    mass = np.diff(stats.poisson.cdf(edges - 1, lam))
    mass[0] += stats.poisson.cdf(low - 1, lam)
    mass[-1] += stats.poisson.sf(high, lam)
    _, p = stats.chisquare(observed, mass / mass.sum() * draws.size)
    assert p > 1e-4, p


def test_a_huge_mean_gives_its_mean_and_variance_and_zero_gives_zeros():
    lam = 5e10
    draws = SecureRandom().poisson(lam, 100_000)

    assert abs(draws.mean() - lam) < 5 * math.sqrt(lam / draws.size)
    assert draws.var() / lam == pytest.approx(1.0, abs=0.03)
    assert not SecureRandom().poisson(0.0, 5).any()
    with pytest.raises(ValueError, match="finite and >= 0"):
        SecureRandom().poisson(-1.0, 3)


def test_the_shares_of_three_hospitals_sum_to_skellam_noise_of_the_planned_variance():
    planned = 3.0e6
    total = sum(skellam_share((200_000,), planned / 3, SecureRandom()) for _ in range(3))

    assert abs(total.mean()) < 5 * math.sqrt(planned / total.size)
    assert total.var() / planned == pytest.approx(1.0, abs=0.02)
    assert stats.kurtosis(total) == pytest.approx(0.0, abs=0.05)  # Skellam of large mean: Gaussian-shaped


def test_a_single_draw_is_a_draw():
    draws = [int(SecureRandom().poisson(5.0, 1)[0]) for _ in range(50)]

    assert len(set(draws)) > 3 and all(d >= 0 for d in draws)
    assert SecureRandom().poisson(5.0, (0, 3)).shape == (0, 3)
