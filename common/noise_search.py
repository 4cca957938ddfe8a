"""The least noise multiplier that keeps a privacy cost within a target: the search every DP plan uses
(``privacy=dp``'s rounds and releases at a hospital, ``privacy=distributed_dp``'s run plan at the coordinator and
the hospitals alike)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["least_noise", "secant"]


def least_noise(eps: Callable[[float], float], target: float, ceiling: float) -> float:
    """The least noise multiplier up to ``ceiling`` (to 0.1 %) whose ``eps`` is at most ``target``; ``inf`` when
    even ``ceiling`` does not fit.

    Every look narrows a bracket (low, high] with eps(low) > target >= eps(high), and the answer is its top once it
    is 0.1 % wide, as plain halving finds it. Epsilon falls smoothly with the noise, so where to look next is the
    secant of log epsilon against log noise through the last two looks (halving where it cannot say), and a step
    just across once it points where the last look was: about half the looks of halving (each ~0.3 s of Opacus'
    RDP at a sampling rate below 1).
    """
    e = eps(ceiling)
    if e > target:
        return math.inf
    low, high = 0.0, ceiling
    looks = [(ceiling, e)]
    x = ceiling * e / target  # epsilon falls about as 1 / noise
    while high - low > 1e-3 * high:  # pragma: no mutate (> or >=: a float width is never exactly 0.1 %)
        if not low < x < high:  # pragma: no mutate (< or <=: a look exactly at an end would only repeat it)
            x = (low + high) / 2
        x = max(x, high / 64)  # never far below the least noise seen to fit: RDP's arithmetic fails near 0
        e = eps(x)
        low, high = (x, high) if e > target else (low, x)
        looks.append((x, e))
        x = secant(looks[-2], looks[-1], target)
        close = 4e-4 * high  # where it points is where we are: step across to close the bracket
        if abs(x - looks[-1][0]) < close:  # pragma: no mutate (< or <=: a float distance is never exactly that)
            x = looks[-1][0] * (1 + 8e-4 if e > target else 1 - 8e-4)
    return high


def secant(a: tuple[float, float], b: tuple[float, float], target: float) -> float:
    """Where log epsilon reaches log ``target`` on the line through two looks (noise, epsilon); NaN when the line
    says nothing (an infinite or zero epsilon, one noise twice, epsilon not falling)."""
    (xa, ea), (xb, eb) = a, b
    if xa == xb or not all(0 < e < math.inf for e in (ea, eb)):
        return math.nan
    slope = (math.log(eb) - math.log(ea)) / (math.log(xb) - math.log(xa))
    return xb * math.exp((math.log(target) - math.log(eb)) / slope) if slope < 0 else math.nan
