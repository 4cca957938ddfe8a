"""Partitioners that share a labelled pool out to simulated hospitals, and stratified hold-out splits.

Schemes (``partition_indices``):

- ``iid``: shuffle and split evenly.
- ``dirichlet``: label skew after Hsu et al. (2019): for every class, the share of each hospital is drawn from
  ``Dir(alpha)``; small ``alpha`` gives hospitals that see mostly one class. Draws are repeated (from the same
  seeded generator) until every hospital holds at least ``min_size`` samples.
- ``quantity``: quantity skew: hospital sizes follow ``min_size + Dir(alpha)`` shares of the rest; labels are iid.

All functions are deterministic given the seed and return sorted int64 position arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MappingProxyType

import numpy as np

from medfed.common.errors import ConfigError

__all__ = ["SCHEMES", "labelled_subset", "partition_indices", "stratified_split"]

logger = logging.getLogger(__name__)

MAX_DIRICHLET_DRAWS = 1000


def _iid(labels: np.ndarray, n_parts: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(len(labels)), n_parts))


def _dirichlet(
    labels: np.ndarray, n_parts: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for part, chunk in zip(parts, np.split(shuffled, cuts)):
                part.append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ConfigError(
        f"Dirichlet label skew with federation.alpha={alpha} could not give each of {n_parts} hospitals at least "
        f"federation.min_samples={min_size} of {len(labels)} samples in {MAX_DIRICHLET_DRAWS} draws. Use a larger "
        "federation.alpha (e.g. 0.5), fewer federation.hospitals, or a smaller federation.min_samples."
    )


def _quantity(
    labels: np.ndarray, n_parts: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    spare = len(labels) - n_parts * min_size
    shares = rng.dirichlet(np.full(n_parts, alpha))
    extra = np.floor(shares * spare).astype(np.int64)
    extra[np.argmax(shares)] += spare - int(extra.sum())  # rounding remainder to the largest part
    sizes = min_size + extra
    return list(np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1]))


_Scheme = Callable[[np.ndarray, int, float, int, np.random.Generator], list[np.ndarray]]
SCHEMES: MappingProxyType[str, _Scheme] = MappingProxyType(
    {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity}
)


def partition_indices(
    labels: np.ndarray, n_parts: int, scheme: str, *, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into ``n_parts`` disjoint, covering, sorted int64 arrays.

    Raises:
        ConfigError: unknown scheme, bad ``n_parts``/``alpha``/``seed``, too few samples for ``n_parts * min_size``,
            or a Dirichlet draw that cannot honour ``min_size``.
    """
    labels = np.asarray(labels).reshape(-1)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"federation.partition={scheme!r} is not a known partition scheme; choose one of: {', '.join(SCHEMES)}."
        )
    if n_parts < 1:
        raise ConfigError(f"federation.hospitals={n_parts!r} is out of range; it must be >= 1.")
    if scheme != "iid" and not alpha > 0:
        raise ConfigError(f"federation.alpha={alpha!r} is out of range; it must be > 0.")
    if seed < 0:
        raise ConfigError(f"federation.seed={seed!r} is out of range; it must be >= 0.")
    min_size = max(int(min_size), 0)
    if n_parts * max(min_size, 1) > len(labels):
        raise ConfigError(
            f"{len(labels)} samples cannot give federation.hospitals={n_parts} hospitals at least "
            f"federation.min_samples={max(min_size, 1)} each (needs {n_parts * max(min_size, 1)}). Use fewer "
            "hospitals, a smaller federation.min_samples, or a larger dataset."
        )
    rng = np.random.default_rng(seed)
    parts = SCHEMES[scheme](labels, n_parts, float(alpha), min_size, rng)
    result = [np.sort(p).astype(np.int64) for p in parts]
    logger.debug("Partition %s over %d parts: sizes %s", scheme, n_parts, [len(p) for p in result])
    return result


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of every class; returns sorted int64 ``(keep_idx, heldout_idx)`` positions.

    Every class with at least two samples gives at least one sample to the held-out set (when ``fraction > 0``)
    and keeps at least one, so even a tiny partition keeps a non-empty training set.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0 <= fraction < 1:
        raise ConfigError(f"federation.val_fraction={fraction!r} is out of range; it must lie in [0, 1).")
    if seed < 0:
        raise ConfigError(f"seed={seed!r} is out of range for stratified_split; it must be >= 0.")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    empty = np.empty(0, dtype=np.int64)
    keep_idx = np.sort(np.concatenate(keep)).astype(np.int64) if keep else empty
    held_idx = np.sort(np.concatenate(held)).astype(np.int64) if held else empty
    return keep_idx, held_idx


def labelled_subset(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """The sorted positions that keep their labels when only ``fraction`` of a hospital's training images are
    labelled: per class ``max(1, round(fraction x count))`` images, chosen at random (seeded), so every class the
    hospital holds stays represented.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0 < fraction <= 1:
        raise ConfigError(f"dataset.label_fraction={fraction!r} is out of range; it must lie in (0, 1].")
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == c))[: max(1, int(round(fraction * np.sum(labels == c))))]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)
