"""Random numbers from the operating system's cryptographically secure source, for distributed DP's noise shares
and Poisson sampling (issue 20).

A hospital's noise share must be unpredictable to the coordinator, who would otherwise subtract it from the sum; a
seeded generator (numpy's PCG64, torch's Mersenne Twister) is predictable from its seed or from enough of its
outputs. Every uniform variate here is 53 random bits read from ``os.urandom`` (the kernel's CSPRNG), and Poisson
variates are made from them by the exact algorithms numpy itself uses: multiplication of uniforms for small means
and Hoermann's transformed rejection with squeeze (PTRS, 1993) from mean 10 up. They need no package beyond numpy,
so every site has a secure source for distributed DP (unlike ``privacy=dp``, whose Opacus noise needs torchcsprng).
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["SecureRandom"]

_PTRS_FROM = 10.0  # numpy switches to PTRS at the same mean


class SecureRandom:
    """The two draws distributed DP needs, from ``os.urandom``; ``poisson`` takes numpy's ``Generator`` arguments,
    so it can stand where :func:`medfed.common.skellam.skellam_share` takes a generator."""

    def random(self, size: int) -> np.ndarray:
        """``size`` uniform variates in [0, 1), each of 53 secure random bits."""
        words = np.frombuffer(os.urandom(8 * int(size)), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def poisson(self, lam: float, size: tuple[int, ...] | int) -> np.ndarray:
        """Poisson variates of mean ``lam`` (exact up to float64 arithmetic, as numpy's own)."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        if lam < 0 or not math.isfinite(lam):
            raise ValueError(f"a Poisson mean is finite and >= 0, not {lam!r}.")
        if lam == 0 or n == 0:
            return np.zeros(shape, dtype=np.int64)
        out = self._multiplication(lam, n) if lam < _PTRS_FROM else self._ptrs(lam, n)
        return out.reshape(shape)

    def _multiplication(self, lam: float, n: int) -> np.ndarray:
        """Knuth's method: the number of uniforms whose running product stays above ``exp(-lam)``."""
        limit = math.exp(-lam)
        counts = np.zeros(n, dtype=np.int64)
        product = np.ones(n)
        open_ = np.arange(n)
        while open_.size:
            product[open_] *= self.random(open_.size)
            going = product[open_] > limit
            counts[open_[going]] += 1
            open_ = open_[going]
        return counts

    def _ptrs(self, lam: float, n: int) -> np.ndarray:
        """Hoermann's PTRS, vectorised: every pending draw tries a candidate until one is accepted."""
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        pending = np.arange(n)
        while pending.size:
            u = self.random(pending.size) - 0.5
            v = self.random(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            possible = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            check = np.flatnonzero(possible)
            lhs = np.log(v[check]) + math.log(invalpha) - np.log(a / (us[check] ** 2) + b)
            rhs = -lam + k[check] * loglam - _lgamma(k[check] + 1)
            accepted = quick.copy()
            accepted[check[lhs <= rhs]] = True
            out[pending[accepted]] = k[accepted].astype(np.int64)
            pending = pending[~accepted]
        return out


def _lgamma(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.gammaln(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
