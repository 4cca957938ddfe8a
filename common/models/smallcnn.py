"""``smallcnn``: a fast CNN (GroupNorm by default) for small 2D images and 3D volumes, plus shared building blocks.

Layout (``w`` = width), each conv a 3x3 (3x3x3) kernel followed by a normalisation (GroupNorm, or BatchNorm with
``norm="batch"``) and ReLU:

- 2D: ``conv(in->w)``, max-pool /2, ``conv(w->2w)``, ``conv(2w->2w)``, max-pool /2, ``conv(2w->4w)``
  (~130k parameters at ``w=32`` for grey images; 28 px -> 14 -> 7).
- 3D: one conv per stage, ``conv(in->w)``, pool, ``conv(w->2w)``, pool, ``conv(2w->4w)`` (cheaper on volumes).

then global average pooling, dropout and a linear ``head``. With the default GroupNorm there is no BatchNorm and no
in-place op, so Opacus' ``ModuleValidator`` accepts the network as is. ``norm="batch"`` (``model.norm=batch``) is for
runs without sample-level DP: BatchNorm mixes the images of a batch, which per-sample gradients cannot allow, but it
generalises better on small datasets (BreastMNIST, docs/benchmarks.md). ``encoder`` (or
:meth:`SmallCNN.forward_features`) gives the pooled ``(B, 4w)`` features for linear probing.

This module also holds the helpers shared with :mod:`common.models.resnet`: :func:`group_norm`, :func:`norm_layer`,
:func:`conv_layer`, :func:`max_pool_layer`, :func:`adaptive_avg_pool_layer` and the base class
:class:`PooledClassifier`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from medfed.common.config import MODEL_NORMS
from medfed.common.errors import ConfigError
from medfed.common.models.registry import register_model

__all__ = [
    "FederatedBatchNorm2d",
    "FederatedBatchNorm3d",
    "PooledClassifier",
    "SmallCNN",
    "adaptive_avg_pool_layer",
    "check_model_args",
    "conv_layer",
    "group_norm",
    "max_pool_layer",
    "norm_layer",
    "smallcnn",
]

logger = logging.getLogger(__name__)

MAX_GROUPS = 32


def group_norm(channels: int, *, max_groups: int = MAX_GROUPS) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with the largest group count <= ``max_groups`` that divides ``channels``.

    Groups keep at least two channels each when ``channels`` allows it (so 32 channels get 16 groups, 64 get the
    classic 32); a single channel gets one group.
    """
    if channels < 1:
        raise ConfigError(f"channels={channels!r} is out of range for GroupNorm; it must be >= 1.")
    limit = min(max_groups, channels // 2) if channels > 1 else 1
    groups = max(g for g in range(1, max(limit, 1) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _WithoutBatchCounter:
    """BatchNorm without the ``num_batches_tracked`` counter: with a fixed momentum the counter is never read, and an
    integer buffer would be averaged into a float by the aggregation. The running mean and variance stay, so the
    coordinator averages them with the weights (FedAvg), or a hospital keeps them (``personalize.local_layers=norm``,
    FedBN)."""

    num_batches_tracked: torch.Tensor | None

    def __init__(self, channels: int) -> None:
        super().__init__(channels)  # type: ignore[call-arg]  # a mixin: the next class in the MRO is a BatchNorm
        self.num_batches_tracked = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # noqa: ANN001
        # as version 2: PyTorch's BatchNorm would otherwise add a num_batches_tracked entry (for old checkpoints)
        super()._load_from_state_dict(  # type: ignore[misc]  # a mixin: the next class in the MRO is a BatchNorm
            state_dict, prefix, {**local_metadata, "version": 2}, *args, **kwargs)


class FederatedBatchNorm2d(_WithoutBatchCounter, nn.BatchNorm2d):
    """2D BatchNorm whose state holds only float tensors (weight, bias, running mean and variance)."""


class FederatedBatchNorm3d(_WithoutBatchCounter, nn.BatchNorm3d):
    """3D BatchNorm whose state holds only float tensors (weight, bias, running mean and variance)."""


def _require_norm(norm: str) -> None:
    if norm not in MODEL_NORMS:
        raise ConfigError(f"model.norm={norm!r} is not supported; choose one of: {', '.join(MODEL_NORMS)}.")


def norm_layer(spatial_dims: int, channels: int, norm: str = "group") -> nn.Module:
    """The normalisation after a convolution: ``group`` (:func:`group_norm`, works with DP-SGD) or ``batch``
    (:class:`FederatedBatchNorm2d`/``3d``; not with sample-level DP)."""
    _require_norm(norm)
    if norm == "group":
        return group_norm(channels)
    return FederatedBatchNorm2d(channels) if spatial_dims == 2 else FederatedBatchNorm3d(channels)


def conv_layer(
    spatial_dims: int, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1, bias: bool = True
) -> nn.Module:
    """A 2D or 3D convolution with "same" padding for odd kernels."""
    conv_cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv_cls(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


def max_pool_layer(spatial_dims: int, kernel_size: int = 2) -> nn.Module:
    """A 2D or 3D max pool (floor mode, so odd sides shrink by flooring)."""
    return nn.MaxPool2d(kernel_size) if spatial_dims == 2 else nn.MaxPool3d(kernel_size)


def adaptive_avg_pool_layer(spatial_dims: int) -> nn.Module:
    """A 2D or 3D global average pool to a single voxel."""
    return nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)


def check_model_args(
    *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str = "group"
) -> None:
    """Validate the common constructor arguments; raises :class:`ConfigError` naming the bad one."""
    for key, value, minimum in (("in_channels", in_channels, 1), ("n_classes", n_classes, 2), ("width", width, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r} is out of range; it must be an int >= {minimum}.")
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims={spatial_dims!r} is not supported; choose one of: 2, 3.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} is out of range; it must lie in [0, 1).")
    _require_norm(norm)


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=conv_layer(spatial_dims, in_channels, out_channels, bias=False),
            norm=norm_layer(spatial_dims, out_channels, norm),
            act=nn.ReLU(),
        )
    )


class PooledClassifier(nn.Module):
    """Base of the registered networks: ``encoder`` (ending in global pooling) -> dropout -> linear ``head``."""

    encoder: nn.Sequential
    head: nn.Linear

    def _attach_head(
        self, layers: OrderedDict[str, nn.Module], channels: int, *, spatial_dims: int, n_classes: int, dropout: float
    ) -> None:
        layers["pool"] = adaptive_avg_pool_layer(spatial_dims)
        layers["flatten"] = nn.Flatten(1)
        self.spatial_dims = spatial_dims
        self.num_features = channels
        self.encoder = nn.Sequential(layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, n_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` of images ``(B, C, *spatial)``."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.head(self.dropout(self.encoder(x)))


class SmallCNN(PooledClassifier):
    """Small CNN classifier (GroupNorm, or BatchNorm) for 2D images or 3D volumes (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels, >= 1.
        n_classes: output logits, >= 2.
        width: channels of the first stage (later stages use 2x and 4x), >= 1.
        dropout: dropout probability before the head, in [0, 1).
        norm: ``group`` (GroupNorm, DP-compatible) or ``batch`` (BatchNorm, runs without sample-level DP).
        convs_per_stage: convolutions in each of the three stages; default ``(1, 2, 1)`` in 2D, ``(1, 1, 1)`` in 3D.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        n_classes: int = 2,
        width: int = 32,
        dropout: float = 0.0,
        norm: str = "group",
        convs_per_stage: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_model_args(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                         dropout=dropout, norm=norm)
        if convs_per_stage is None:
            convs_per_stage = (1, 2, 1) if spatial_dims == 2 else (1, 1, 1)
        if len(convs_per_stage) < 1 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                           for n in convs_per_stage):
            raise ConfigError(
                f"convs_per_stage={tuple(convs_per_stage)!r} is not allowed; give one int >= 1 per stage, "
                "e.g. (1, 2, 1)."
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for stage, n_convs in enumerate(convs_per_stage):
            if stage > 0:
                layers[f"pool{stage}"] = max_pool_layer(spatial_dims)
            out_channels = width * 2**stage
            for index in range(n_convs):
                layers[f"block{stage + 1}_{index + 1}"] = _conv_block(spatial_dims, channels, out_channels, norm)
                channels = out_channels
        self._attach_head(layers, channels, spatial_dims=spatial_dims, n_classes=n_classes, dropout=dropout)


@register_model("smallcnn")
def smallcnn(
    *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str = "group"
) -> nn.Module:
    """Factory of :class:`SmallCNN` for the model registry."""
    return SmallCNN(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                    dropout=dropout, norm=norm)
