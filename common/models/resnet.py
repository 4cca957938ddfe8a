"""``resnet18``: a ResNet-18-style encoder for small medical images, 2D or 3D, GroupNorm or BatchNorm, no in-place
ops.

BasicBlocks ``[2, 2, 2, 2]`` with channels ``w, 2w, 4w, 8w`` (``w`` = width; ``w=64`` gives the classic ResNet-18
widths, the config default is 32), strides ``1, 2, 2, 2``. The stem is adapted to small images: a single 3x3
(3x3x3) convolution with stride 1 and *no* max pool, because the image size is not known when the model is built
and MedMNIST-sized inputs (28-64 px) would be reduced to a few pixels by the ImageNet stem (7x7 stride 2 + pool).
For large images (>= 128 px) this stem is expensive; downsample the images first or add a model with a strided stem.

Unlike MONAI's ResNet blocks (``out += residual``, ``ReLU(inplace=True)``), every op here is out of place
(``out = out + identity``) and every norm is GroupNorm, so Opacus can compute per-sample gradients (``norm="batch"``
gives BatchNorm instead, for runs without sample-level DP). ``encoder``
(or :meth:`ResNet18.forward_features`) gives the pooled ``(B, 8w)`` features; ``head`` is the linear classifier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from medfed.common.models.registry import register_model
from medfed.common.models.smallcnn import PooledClassifier, check_model_args, conv_layer, norm_layer

__all__ = ["BasicBlock", "ResNet18", "resnet18"]

logger = logging.getLogger(__name__)

BLOCKS_PER_STAGE = (2, 2, 2, 2)
STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each normalised (GroupNorm or BatchNorm), and an out-of-place residual add (1x1 projection
    when the shape changes)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "group"
    ) -> None:
        super().__init__()
        self.conv1 = conv_layer(spatial_dims, in_channels, out_channels, stride=stride, bias=False)
        self.norm1 = norm_layer(spatial_dims, out_channels, norm)
        self.act1 = nn.ReLU()
        self.conv2 = conv_layer(spatial_dims, out_channels, out_channels, bias=False)
        self.norm2 = norm_layer(spatial_dims, out_channels, norm)
        self.act2 = nn.ReLU()
        self.downsample: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                OrderedDict(
                    conv=conv_layer(spatial_dims, in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                    norm=norm_layer(spatial_dims, out_channels, norm),
                )
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, out of place."""
        identity = self.downsample(x)
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out = out + identity
        return self.act2(out)


class ResNet18(PooledClassifier):
    """ResNet-18-style classifier (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels, >= 1.
        n_classes: output logits, >= 2.
        width: channels of the first stage (later stages 2x, 4x, 8x), >= 1; 64 is the classic ResNet-18.
        dropout: dropout probability before the head, in [0, 1).
        norm: ``group`` (GroupNorm, DP-compatible) or ``batch`` (BatchNorm, runs without sample-level DP).
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
    ) -> None:
        super().__init__()
        check_model_args(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                         dropout=dropout, norm=norm)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = nn.Sequential(
            OrderedDict(
                conv=conv_layer(spatial_dims, in_channels, width, bias=False),
                norm=norm_layer(spatial_dims, width, norm),
                act=nn.ReLU(),
            )
        )
        channels = width
        for stage, (n_blocks, stride) in enumerate(zip(BLOCKS_PER_STAGE, STAGE_STRIDES, strict=True)):
            out_channels = width * 2**stage
            blocks = []
            for index in range(n_blocks):
                blocks.append(
                    BasicBlock(spatial_dims, channels, out_channels, stride=stride if index == 0 else 1, norm=norm)
                )
                channels = out_channels
            layers[f"layer{stage + 1}"] = nn.Sequential(*blocks)
        self._attach_head(layers, channels, spatial_dims=spatial_dims, n_classes=n_classes, dropout=dropout)


@register_model("resnet18")
def resnet18(
    *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str = "group"
) -> nn.Module:
    """Factory of :class:`ResNet18` for the model registry."""
    return ResNet18(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                    dropout=dropout, norm=norm)
