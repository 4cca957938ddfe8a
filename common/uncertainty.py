"""Predictive uncertainty: Monte-Carlo dropout, ensembles, and referral of the most uncertain cases to a human.

A model's uncertainty about an image is the entropy of its (mean) predictive distribution. *Referral* keeps the
model's decision on the most certain ``1 - k`` of the images and sends the most uncertain ``k`` to a clinician;
:func:`referral_curve` reports the metrics on what the model keeps, so a falling error with rising ``k`` shows
that the uncertainty is informative.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfed.common.errors import ConfigError
from medfed.common.inference import predict_logits, softmax
from medfed.common.metrics import EPS, classification_metrics

__all__ = [
    "REFERRAL_FRACTIONS",
    "dropout_rate",
    "labelling_scores",
    "mc_dropout_proba",
    "mean_proba",
    "predictive_entropy",
    "rank_for_labelling",
    "referral_curve",
]

logger = logging.getLogger(__name__)

REFERRAL_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def dropout_rate(model: nn.Module) -> float:
    """The largest dropout probability among the model's dropout layers (0: none, or all at p=0)."""
    rates = [float(m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    return max(rates, default=0.0)


def mc_dropout_proba(
    model: nn.Module,
    images: np.ndarray,
    *,
    samples: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``samples`` stochastic passes with dropout active: class probabilities ``(samples, N, C)``.

    Raises:
        ConfigError: the model has no active dropout (MC dropout would return ``samples`` identical passes), or
            ``samples < 2``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"MC-dropout samples={samples!r} is out of range; it must be an int >= 2.")
    if dropout_rate(model) <= 0.0:
        raise ConfigError(
            "MC dropout needs a model with dropout, and this one has none (model.dropout=0). Train with "
            "model.dropout=0.2 (for example), or set evaluate.mc_samples=0."
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        passes = [
            softmax(predict_logits(model, images, batch_size=batch_size, device=device, stochastic=True), temperature)
            for _ in range(samples)
        ]
    finally:
        torch.random.set_rng_state(generator_state)
    return np.stack(passes)


def mean_proba(members: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's predictive distribution: the mean of its members' class probabilities ``(N, C)`` each.

    Raises:
        ValueError: no member, or members of different shapes.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member; got none.")
    shapes = {np.shape(m) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members must predict the same images and classes; got shapes {sorted(shapes)}.")
    return np.mean(np.stack([np.asarray(m, dtype=np.float64) for m in members]), axis=0)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of ``probs`` ``(N, C)``: 0 for a certain prediction, log C for a uniform one."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def labelling_scores(method: str, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image, how much labelling it would teach the model (higher: label it sooner), from its class
    probabilities ``(N, C)``: ``entropy`` (predictive entropy), ``margin`` (1 - (top-1 - top-2 probability)) or
    ``random`` (a draw of ``rng``: the baseline to compare with).

    Raises:
        ConfigError: another method.
    """
    if method == "entropy":
        return predictive_entropy(probs)
    if method == "margin":
        top = np.sort(np.asarray(probs, dtype=np.float64), axis=1)
        return 1.0 - (top[:, -1] - top[:, -2])
    if method == "random":
        return rng.random(int(np.shape(probs)[0]))
    raise ConfigError(f"labelling method {method!r} is unknown; choose one of: entropy, margin, random.")


def rank_for_labelling(scores: np.ndarray) -> np.ndarray:
    """Indices from the most to the least informative image (ties: the earlier image first)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def referral_curve(
    labels: np.ndarray,
    probs: np.ndarray,
    uncertainty: np.ndarray,
    fractions: Sequence[float] = REFERRAL_FRACTIONS,
) -> list[dict[str, float]]:
    """Metrics on the images the model keeps when the most uncertain fraction ``k`` is referred to a human.

    For each ``k`` of ``fractions`` the ``round(k * N)`` images with the highest ``uncertainty`` are set aside
    (ties broken by position, so the result is deterministic) and ``auc``, ``acc`` and ``ece`` are computed on the
    rest; ``kept`` is the number of images left. ``auc`` is nan when the kept images hold one class.

    Raises:
        ValueError: lengths differ, or a fraction outside ``[0, 1)``.
    """
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if not (y.size == u.size == p.shape[0]):
        raise ValueError(f"labels ({y.size}), probs ({p.shape[0]}) and uncertainty ({u.size}) must have one entry "
                         "per image.")
    order = np.argsort(u, kind="stable")  # most certain first
    curve = []
    for fraction in fractions:
        if not 0.0 <= float(fraction) < 1.0:
            raise ValueError(f"referral fraction {fraction!r} is out of range; it must lie in [0, 1).")
        kept = order[: y.size - int(round(float(fraction) * y.size))]
        metrics = classification_metrics(y[kept], p[kept])
        curve.append({"refer": float(fraction), "kept": float(kept.size), "auc": metrics["auc"],
                      "acc": metrics["acc"], "ece": metrics["ece"]})
    return curve
