"""Checks on each hospital's model update before any strategy aggregates it.

One hospital's broken or hostile update must not spoil the round or crash the run: an update whose arrays do not
match the global model (names, shapes), that holds NaN or inf, or whose distance from the global model is absurd
next to the other hospitals' is rejected with a reason that names only arrays and numbers (never data), and the
round goes on with the others. The norm check compares each update's L2 distance from the global model with the
median distance of the round's well-formed updates, so it needs at least three of them (with two, neither can be
told to be the outlier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_UPDATES_FOR_NORM_CHECK", "check_updates"]

MIN_UPDATES_FOR_NORM_CHECK = 3


def _shape_problem(names: Sequence[str], reference: Sequence[np.ndarray], names_i: Sequence[str],
                   arrays: Sequence[np.ndarray]) -> str | None:
    if list(names_i) != list(names):
        missing = sorted(set(names) - set(names_i))
        extra = sorted(set(names_i) - set(names))
        return f"its arrays do not match the global model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref, got in zip(names, reference, arrays, strict=True):
        if got.shape != ref.shape:
            return f"array {name!r} has shape {tuple(got.shape)}, the global model's is {tuple(ref.shape)}"
    return None


def check_updates(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    updates: Sequence[tuple[Sequence[str], Sequence[np.ndarray]]],
    *,
    max_norm_ratio: float,
) -> list[str | None]:
    """For each update (its array names and arrays), ``None`` when it may be aggregated, else why not.

    ``reference`` is the global model the round started from (``names`` its array names); ``max_norm_ratio`` is
    how many times the round's median distance from it an update may be (0 turns the norm check off).
    """
    reasons: list[str | None] = []
    distances: dict[int, float] = {}
    for index, (names_i, arrays) in enumerate(updates):
        problem = _shape_problem(names, reference, names_i, arrays)
        if problem is None:
            bad = [name for name, a in zip(names, arrays, strict=True)
                   if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
            if bad:
                problem = f"array {bad[0]!r} holds NaN or inf values"
        if problem is None:
            distances[index] = math.sqrt(sum(
                float(np.sum((np.asarray(a, np.float64) - np.asarray(r, np.float64)) ** 2))
                for a, r in zip(arrays, reference, strict=True)
                if np.issubdtype(a.dtype, np.floating)))
        reasons.append(problem)
    if max_norm_ratio > 0 and len(distances) >= MIN_UPDATES_FOR_NORM_CHECK:
        median = float(np.median(list(distances.values())))
        for index, distance in distances.items():
            if median > 0 and distance > max_norm_ratio * median:
                reasons[index] = (
                    f"its distance from the global model, {distance:.4g}, is {distance / median:.1f} x the round's "
                    f"median {median:.4g} (strategy.max_update_norm_ratio={max_norm_ratio:g})"
                )
    return reasons
