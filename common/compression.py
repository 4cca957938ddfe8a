"""Lean model updates: what a hospital sends after training, in fewer bytes (``strategy.compression``).

A hospital compresses its *update* (its trained weights minus the global model it received), never the weights
themselves: an update is small next to the weights, so its rounding error is too. The coordinator, which knows the
global model it sent, decodes every reply back to full weights before any strategy or check sees it, so every
aggregation (FedAvg, the server optimizers, the robust ones) works on the same kind of input as without compression.

- ``none``: the trained weights, float32 (today's layout).
- ``fp16``: the update in IEEE half precision: half the bytes; per coordinate a relative error of at most 2**-11
  (values below half's smallest normal, 6.1e-5, lose up to 2**-25 absolute).
- ``int8``: the update of each array scaled by ``max|update| / 127`` and rounded *stochastically* to an integer in
  [-127, 127] (up with probability equal to the fraction), plus one float32 scale per array: about a quarter of the
  bytes; the decoded update is unbiased and each coordinate is within one step (``max|update| / 127``) of the true
  one. The rounding is seeded per site and round (reproducible runs), which is fine: what is rounded is already the
  trained update.

Under ``privacy=dp`` the update is compressed after DP-SGD has clipped and noised it, so compression is
post-processing and the site's epsilon is untouched. Runs whose privacy works on the update after it leaves the
training loop are refused at config time (:mod:`common.config.rules`): ``privacy=central_dp`` (the clipping bound
must hold for what the coordinator adds noise to) and secure aggregation (SecAgg+ quantises the update itself).
Non-float arrays (e.g. BatchNorm's step counter) travel as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

__all__ = ["COMPRESSIONS", "CompressionError", "INT8_SCALES", "compress_update", "decompress_update"]

logger = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "int8")
"""The values ``strategy.compression`` accepts."""

INT8_SCALES = "medfed-int8-scales"
"""The array name of an int8 update's per-array scales (a hyphen: never the name of a torch parameter)."""

_INT8_MAX = 127


class CompressionError(ValueError):
    """A reply whose arrays are not the compressed update the run's ``strategy.compression`` says (the message
    names arrays, dtypes and the setting only)."""


def _floating(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def compress_update(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], method: str, *, seed: int
) -> dict[str, np.ndarray]:
    """The arrays a hospital sends for ``trained`` weights that started from ``received``, in ``method``
    (:data:`COMPRESSIONS`), in the same order; ``seed`` drives int8's stochastic rounding.

    Raises:
        ValueError: an unknown method, or ``trained`` and ``received`` with different arrays.
    """
    if method not in COMPRESSIONS:
        raise ValueError(f"compression {method!r} is not one of {', '.join(COMPRESSIONS)}")
    if list(trained) != list(received):
        raise ValueError("the trained and received models have different arrays")
    if method == "none":
        return {name: np.asarray(value) for name, value in trained.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    scales: list[float] = []
    for name, value in trained.items():
        value = np.asarray(value)
        if not _floating(value):
            out[name] = value
            continue
        update = value.astype(np.float64) - np.asarray(received[name], np.float64)
        if method == "fp16":
            out[name] = update.astype(np.float16)
            continue
        top = float(np.max(np.abs(update))) if update.size else 0.0
        if not np.isfinite(top):  # a diverged update: decoded as NaN, so the coordinator's checks reject it
            out[name] = np.zeros(update.shape, np.int8)
            scales.append(float("nan"))
            continue
        scale = top / _INT8_MAX if top > 0 else 1.0
        scaled = update / scale
        low = np.floor(scaled)
        rounded = low + (rng.random(scaled.shape) < (scaled - low))  # up with probability of the fraction
        out[name] = np.clip(rounded, -_INT8_MAX, _INT8_MAX).astype(np.int8)
        scales.append(scale)
    if method == "int8":
        out[INT8_SCALES] = np.asarray(scales, np.float32)
    return out


def decompress_update(
    sent: Mapping[str, np.ndarray], global_model: Mapping[str, np.ndarray], method: str
) -> dict[str, np.ndarray]:
    """The full weights a hospital's reply stands for: ``global_model`` plus the decoded update (in the global
    model's dtypes and order); for ``none`` the arrays as sent.

    Raises:
        CompressionError: the reply is not laid out as ``method`` writes it (names, dtypes, the scales).
    """
    if method == "none":
        return dict(sent)
    names = list(global_model)
    expected = names + ([INT8_SCALES] if method == "int8" else [])
    if list(sent) != expected:
        missing = sorted(set(expected) - set(sent))
        extra = sorted(set(sent) - set(expected))
        raise CompressionError(f"its arrays are not a {method} update of the global model (missing {missing[:3]}, "
                               f"unexpected {extra[:3]}; strategy.compression={method})")
    floating = [name for name in names if _floating(np.asarray(global_model[name]))]
    scales = np.asarray(sent[INT8_SCALES], np.float64) if method == "int8" else None
    if scales is not None and scales.shape != (len(floating),):
        raise CompressionError(f"its {INT8_SCALES!r} holds {scales.size} scales for {len(floating)} float arrays "
                               f"(strategy.compression={method})")
    wire = np.dtype(np.float16) if method == "fp16" else np.dtype(np.int8)
    out: dict[str, np.ndarray] = {}
    index = 0
    for name in names:
        reference = np.asarray(global_model[name])
        got = np.asarray(sent[name])
        if name not in floating:
            out[name] = got
            continue
        if got.dtype != wire or got.shape != reference.shape:
            raise CompressionError(
                f"array {name!r} arrived as {got.dtype} {tuple(got.shape)}, a {method} update of the global "
                f"model's is {wire} {tuple(reference.shape)} (strategy.compression={method})")
        update = got.astype(np.float64)
        if scales is not None:
            update = update * scales[index]
        index += 1
        out[name] = (reference.astype(np.float64) + update).astype(reference.dtype)
    return out
