"""A hospital's contribution to a distributed-DP round (issue 20): its per-sample gradients, clipped, scaled and
rounded to integers one by one, summed, plus its share of Skellam noise.

The per-sample gradients come from Opacus' ``GradSampleModule`` (the hooks ``privacy=dp`` trains with, including
this project's faster convolution sampler). Each image's gradient over the trainable parameters is clipped to L2
norm ``clip``, multiplied by ``scale`` and rounded to the nearest integers *before* the sum, so that one image moves
the sum by at most :func:`medfed.common.skellam.rounded_sensitivity` whatever the others are; the arithmetic after
the scaling is in float64 and int64, exact for the magnitudes a run allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from medfed.common.skellam import IntegerTransport, PoissonSource, skellam_share
from torch import nn

__all__ = ["IntegerSum", "integer_gradient_sum", "noised_contribution"]


@dataclass(frozen=True)
class IntegerSum:
    """The integer sum of a batch's clipped, scaled, rounded per-sample gradients (flattened over the trainable
    parameters in ``named_parameters`` order); ``images``: how many were summed; ``clipped``: how many of them had a
    gradient longer than the clip."""

    values: np.ndarray
    images: int
    clipped: int


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch's summed cross-entropy; for per-view logits ``(B, V, classes)`` each image's loss is the mean of
    its views' (one gradient per image, as :class:`~medfed.client.frozen_features.ViewMeanCrossEntropy`)."""
    if logits.ndim == 3:
        views = logits.shape[1]
        each = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat_interleave(views),
                                           reduction="none")
        return each.reshape(-1, views).mean(dim=1).sum()
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def integer_gradient_sum(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, clip: float,
                         scale: float) -> IntegerSum:
    """The sum over ``images`` of each one's cross-entropy gradient, clipped to L2 norm ``clip``, times ``scale``,
    rounded to the nearest integers on its own. ``model`` is left as it was (no hooks, no gradients)."""
    if clip <= 0 or scale <= 0:
        raise ValueError(f"clip ({clip!r}) and scale ({scale!r}) must be positive.")
    params = _trainable(model)
    dim = sum(p.numel() for p in params)
    if len(images) == 0:  # Poisson sampling may draw no image: the contribution is then noise alone
        return IntegerSum(np.zeros(dim, dtype=np.int64), 0, 0)
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")  # the loss below is a sum, not a mean
    try:
        wrapped.zero_grad(set_to_none=True)
        loss = _summed_loss(wrapped(images), labels)
        loss.backward()
        samples = [p.grad_sample for p in params]  # type: ignore[attr-defined]  # set by Opacus' hooks
        per_sample = torch.cat([s.reshape(len(images), -1) for s in samples], dim=1).double()
    finally:
        wrapped.zero_grad(set_to_none=True)
        wrapped._close()  # Opacus' own clean-up: its hooks and the attributes it set on the parameters
    norms = per_sample.norm(dim=1)
    factors = (clip / norms.clamp(min=1e-12)).clamp(max=1.0)
    rounded = torch.round(per_sample * (factors * scale)[:, None]).to(torch.int64)
    return IntegerSum(rounded.sum(dim=0).numpy(), len(images), int((norms > clip).sum()))


def noised_contribution(total: IntegerSum, share_variance: float, transport: IntegerTransport,
                        rng: PoissonSource) -> tuple[np.ndarray, int]:
    """What the hospital hands SecAgg+: its integer sum plus its Skellam share, encoded for the transport; and how
    many coordinates lay outside the transport's range (clipped there, counted here)."""
    noised = total.values + skellam_share(total.values.shape, share_variance, rng)
    return transport.encode(noised)
