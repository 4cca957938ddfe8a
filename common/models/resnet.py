"""``resnet18``: a ResNet-18-style encoder for medical images, 2D or 3D, GroupNorm or BatchNorm, no in-place ops.

BasicBlocks ``[2, 2, 2, 2]`` with channels ``w, 2w, 4w, 8w`` (``w`` = width; ``w=64`` gives the classic ResNet-18
widths, the config default is 32), strides ``1, 2, 2, 2``. Two stems (``model.stem``):

- ``small``: a single 3x3 (3x3x3) convolution with stride 1 and *no* max pool, so MedMNIST-sized inputs (28-64 px)
  keep their resolution (the ImageNet stem would reduce a 28 px image to 7 px before the first block).
- ``imagenet``: torchvision's stem, a 7x7 (7x7x7) convolution with stride 2, norm, ReLU and a 3x3 stride-2 max pool,
  so the blocks see 1/4 of the side (1/16 of the pixels of a 2D image). For images of 128 px or more it is far
  cheaper (at 224 px ``small`` runs layer1 on 224x224 activations, ``imagenet`` on 56x56) and it is the stem that
  ImageNet weights were trained with (:mod:`~medfed.common.models.pretrained` then loads their 7x7 kernel as is).
  With ``width=64``, 3 channels and 1000 classes the parameter count equals torchvision's ``resnet18()``.
- ``auto`` (the default): ``imagenet`` when the factory is told the image side (``image_size``) and it is >= 128 px
  (:data:`AUTO_IMAGENET_FROM`), else ``small`` (:func:`resolve_stem`). The registry does not pass the image size
  today, so ``auto`` builds the small stem: set ``model.stem=imagenet`` for large images.

Both stems name their layers ``stem.conv`` and ``stem.norm`` (the max pool has no weights), so checkpoints differ
only in the stem kernel's size.

Unlike MONAI's ResNet blocks (``out += residual``, ``ReLU(inplace=True)``), every op here is out of place
(``out = out + identity``) and every norm is GroupNorm, so Opacus can compute per-sample gradients (``norm="batch"``
gives BatchNorm instead, for runs without sample-level DP); the max pool has no parameters, so Opacus needs no
per-sample rule for it. ``encoder`` (or :meth:`ResNet18.forward_features`) gives the pooled ``(B, 8w)`` features;
``head`` is the linear classifier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from medfed.common.errors import ConfigError
from medfed.common.models.registry import register_model
from medfed.common.models.smallcnn import PooledClassifier, check_model_args, conv_layer, norm_layer

__all__ = ["AUTO_IMAGENET_FROM", "STEMS", "BasicBlock", "ResNet18", "resnet18", "resolve_stem", "stem_layers"]

logger = logging.getLogger(__name__)

BLOCKS_PER_STAGE = (2, 2, 2, 2)
STAGE_STRIDES = (1, 2, 2, 2)
STEMS = ("auto", "small", "imagenet")
"""The values of ``model.stem`` (:class:`~medfed.common.config.model.ResNetStem`)."""
AUTO_IMAGENET_FROM = 128
"""``stem="auto"`` builds the ImageNet stem for images whose side is at least this many pixels."""


def resolve_stem(stem: str, image_size: int | None = None) -> str:
    """``small`` or ``imagenet`` for ``stem`` (``auto`` | ``small`` | ``imagenet``): ``auto`` is ``imagenet`` for
    images of ``image_size`` >= :data:`AUTO_IMAGENET_FROM` px, ``small`` below that or when the size is unknown.

    Raises:
        ConfigError: ``stem`` is not one of :data:`STEMS`, or ``image_size`` is not a positive int (nor None).
    """
    if stem not in STEMS:
        raise ConfigError(f"model.stem={stem!r} is not allowed; choose one of: {', '.join(STEMS)}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size={image_size!r} is out of range; it must be an int >= 1 (or None: unknown).")
    if stem != "auto":
        return stem
    return "imagenet" if image_size is not None and image_size >= AUTO_IMAGENET_FROM else "small"


def stem_layers(spatial_dims: int, in_channels: int, width: int, *, stem: str, norm: str = "group") -> nn.Sequential:
    """The stem ``conv`` -> ``norm`` -> ``act`` (-> ``pool`` for ``imagenet``); ``stem`` is ``small`` or
    ``imagenet`` (resolve ``auto`` first with :func:`resolve_stem`)."""
    if stem == "small":
        conv = conv_layer(spatial_dims, in_channels, width, bias=False)
    elif stem == "imagenet":
        conv = conv_layer(spatial_dims, in_channels, width, kernel_size=7, stride=2, bias=False)
    else:
        raise ConfigError(f"stem={stem!r} is not a built stem; choose small or imagenet (auto resolves to one).")
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv, norm=norm_layer(spatial_dims, width, norm),
                                                      act=nn.ReLU())
    if stem == "imagenet":
        pool_cls = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        layers["pool"] = pool_cls(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(layers)


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
        stem: ``small`` (3x3 stride 1, no pool), ``imagenet`` (7x7 stride 2 and a 3x3 stride-2 max pool) or ``auto``
            (``imagenet`` from ``image_size`` >= 128 px, else ``small``); see the module docstring.
        image_size: the side of the images in pixels, if known; only ``stem="auto"`` reads it.
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
        stem: str = "auto",
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        check_model_args(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                         dropout=dropout, norm=norm)
        self.stem_kind = resolve_stem(stem, image_size)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = stem_layers(spatial_dims, in_channels, width, stem=self.stem_kind, norm=norm)
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
    *,
    spatial_dims: int,
    in_channels: int,
    n_classes: int,
    width: int,
    dropout: float,
    norm: str = "group",
    stem: str = "auto",
    image_size: int | None = None,
) -> nn.Module:
    """Factory of :class:`ResNet18` for the model registry (``stem``: ``model.stem``; ``image_size``: the images'
    side, which only ``stem="auto"`` reads)."""
    model = ResNet18(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                     dropout=dropout, norm=norm, stem=stem, image_size=image_size)
    if stem == "auto":
        logger.debug("resnet18: model.stem=auto built the %s stem (image size %s)", model.stem_kind,
                     "unknown" if image_size is None else f"{image_size} px")
    return model
