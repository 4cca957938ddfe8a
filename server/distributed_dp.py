"""The coordinator's side of a distributed-DP round (issue 20): what it does with the sum SecAgg+ reveals.

The hospitals' integer sums (clipped, scaled, rounded per-sample gradients plus their noise shares,
:mod:`medfed.client.integer_gradients`) reach the coordinator only as their total. It checks that enough hospitals
are in it (a round with more missing than ``privacy.max_dropouts`` carries too little noise and is discarded, never
applied), turns the total back into a gradient (divided by the scale and by the expected number of images in the
round, a constant fixed before the round so that it reveals nothing), and steps the global model: DP-FedSGD, one
noised gradient step per round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["RoundDiscarded", "apply_integer_sum", "apply_step", "check_participation"]


class RoundDiscarded(RuntimeError):
    """A round whose sum cannot be applied (too few hospitals in it for the noise the run planned)."""


def check_participation(*, sampled: int, active: int, max_dropouts: int) -> None:
    """Raise :class:`RoundDiscarded` when more hospitals than ``max_dropouts`` are missing from the sum."""
    missing = sampled - active
    if missing > max_dropouts:
        raise RoundDiscarded(
            f"{missing} of the round's {sampled} hospitals are missing from the sum, more than privacy.max_dropouts="
            f"{max_dropouts}: the sum carries less noise than every hospital planned, so the round is discarded and "
            "the global model stays as it was. Raise privacy.max_dropouts for the next run (each hospital then adds "
            "more noise) if hospitals drop this often.")


def apply_integer_sum(weights: Mapping[str, np.ndarray], trainable: list[str], total: np.ndarray, *, scale: float,
                      expected_images: float, lr: float) -> dict[str, np.ndarray]:
    """The global weights after one step of ``lr`` along the mean gradient the integer ``total`` encodes
    (``total / (scale * expected_images)``), flattened over the ``trainable`` names in order; other weights (frozen
    layers, buffers) are kept."""
    sizes = [weights[name].size for name in trainable]
    if total.shape != (sum(sizes),):
        raise ValueError(f"the sum has {total.size} values, the trainable weights {sum(sizes)}.")
    if scale <= 0 or expected_images <= 0:
        raise ValueError(f"scale ({scale!r}) and expected_images ({expected_images!r}) must be positive.")
    return apply_step(weights, trainable, total.astype(np.float64) / (scale * expected_images), lr=lr)


def apply_step(weights: Mapping[str, np.ndarray], trainable: list[str], direction: np.ndarray, *,
               lr: float) -> dict[str, np.ndarray]:
    """The weights after a step of ``lr`` against ``direction`` (flattened over the ``trainable`` names in order);
    other weights (frozen layers, buffers) are kept (as copies: nothing returned shares the caller's memory)."""
    sizes = [weights[name].size for name in trainable]
    if direction.shape != (sum(sizes),):
        raise ValueError(f"the step has {direction.size} values, the trainable weights {sum(sizes)}.")
    out = {name: np.array(value, copy=True) for name, value in weights.items()}
    start = 0
    for name, size in zip(trainable, sizes, strict=True):
        step = direction[start:start + size].reshape(weights[name].shape)
        out[name] = (weights[name] - lr * step).astype(weights[name].dtype)
        start += size
    return out
