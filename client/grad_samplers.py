"""Faster per-sample gradients of 2D and 3D convolutions for Opacus' hooks, through its ``register_grad_sampler``.

Opacus' own sampler (``opacus.grad_sample.conv``) unfolds a convolution's input channels-first: the copy gathers
runs as short as one image row (14 floats at 14 px), and a second copy then picks the diagonal of a grouped
result even when there is one group. Here the input is padded channels-last first, so the unfolded copy moves
whole runs of ``kernel width x channels`` floats, and one batched matrix product gives every image's gradient
with no second copy. Timed alone on this project's 2-core CPU, smallcnn's three deeper convolutions took
0.58-0.63 x Opacus' time (batch 32, 28 px); the DP step time in docs/benchmarks.md includes it. The values are
the same (tests compare them with Opacus' sampler and with per-image autograd).

Convolutions this does not cover (grouped, 1D, non-zero padding modes) go to Opacus' sampler unchanged.
Importing this module registers the sampler (:func:`client.training` does, before wrapping a model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from torch import nn

__all__ = ["channels_last_applies", "conv_grad_sample"]


def channels_last_applies(layer: nn.Module) -> bool:
    """Whether :func:`conv_grad_sample` computes ``layer`` itself (else it hands it to Opacus' sampler)."""
    return (
        isinstance(layer, (nn.Conv2d, nn.Conv3d))
        and type(layer) in (nn.Conv2d, nn.Conv3d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
    )


def _pads(layer: nn.Conv2d | nn.Conv3d) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dimension, as the layer's forward applies it."""
    if layer.padding == "valid":
        return [(0, 0)] * len(layer.kernel_size)
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        return [(math.floor(t / 2), t - math.floor(t / 2)) for t in totals]
    return [(int(p), int(p)) for p in layer.padding]


@register_grad_sampler([nn.Conv2d, nn.Conv3d])
def conv_grad_sample(
    layer: nn.Conv2d | nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a 2D or 3D convolution's weight (and bias) from its input and output gradients.

    With ``k`` the kernel's spatial size and ``d`` the spatial dimensions, image ``i``'s weight gradient is
    ``G_i @ U_i``: ``G_i`` its output gradient as (out channels, output positions), ``U_i`` its padded input
    unfolded channels-last as (output positions, kernel offsets x in channels). The result comes back as a view
    in the weight's (out, in, *kernel) order; Opacus copies it into its per-sample buffer.
    """
    if not channels_last_applies(layer):
        return opacus_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)
    n, channels = x.shape[0], x.shape[1]
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if n == 0:
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    dims = x.dim() - 2
    out_spatial = backprops.shape[2:]
    grads = backprops.reshape(n, backprops.shape[1], -1)  # (n, out, positions)
    if layer.weight.requires_grad:
        pad = [p for before_after in reversed(_pads(layer)) for p in before_after]  # F.pad: last dimension first
        padded = F.pad(x.movedim(1, -1), [0, 0, *pad]).contiguous()  # (n, *padded spatial, in) channels-last
        strides = padded.stride()
        spatial = strides[1 : 1 + dims]
        unfolded = padded.as_strided(
            (n, *out_spatial, *layer.kernel_size, channels),
            (
                strides[0],
                *(s * st for s, st in zip(spatial, layer.stride, strict=True)),
                *(s * dl for s, dl in zip(spatial, layer.dilation, strict=True)),
                strides[-1],
            ),
        ).reshape(n, grads.shape[2], -1)  # (n, positions, kernel offsets x in): the one copy
        per_sample = torch.bmm(grads, unfolded)  # (n, out, kernel offsets x in)
        ret[layer.weight] = per_sample.view(n, layer.out_channels, *layer.kernel_size, channels).movedim(-1, 2)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = grads.sum(dim=2)
    return ret
