"""``densenet121``: MONAI's DenseNet-121, 2D or 3D, repackaged as a medfed classifier (GroupNorm, no in-place ops).

The layers are MONAI's own (:class:`monai.networks.nets.DenseNet121`, built with MONAI's initialisation): a 7x7
(7x7x7) stride-2 convolution, norm, ReLU and a 3x3 stride-2 max pool (the stem: the dense blocks see 1/4 of the side),
then dense blocks of ``6, 12, 24, 16`` layers (each a 1x1 bottleneck to ``4k`` channels and a 3x3 convolution adding
``k`` channels, concatenated to its input) with 2x-downsampling transitions between them. The width sets
``init_features = 2 * width`` and ``growth_rate k = width``, so the default ``width=32`` is the classic DenseNet-121
(64 stem features, growth rate 32, 1024 features; with 3 channels, 1000 classes and ``norm="batch"`` the parameter
count equals MONAI's and torchvision's ``densenet121``, 7,978,856). The network downsamples by 32 overall, so it
suits volumes of 64-128^3 voxels and images of 128-512 px; smaller inputs down to 17 px still run (28 px ends at
1x1) but waste most of its depth, and :mod:`~medfed.common.models.smallcnn` or ``resnet18``'s small stem suit them
better.

What differs from ``DenseNet121(spatial_dims, in_channels, out_channels)``:

- **Normalisation**: ``norm="group"`` (the default) builds every norm as GroupNorm with ``G`` groups, ``G`` the
  largest divisor of ``width`` up to 32 (every normalised channel count is a multiple of ``width`` and at least
  ``2 * width``, so ``G`` divides them all and each group holds two or more channels; 32 at the default width). With
  it and out-of-place ReLUs Opacus computes per-sample gradients (the dense layers' ``torch.cat`` needs no rule of
  its own). ``norm="batch"`` builds medfed's :class:`~medfed.common.models.smallcnn.FederatedBatchNorm2d`/``3d``
  (BatchNorm without the integer batch counter), for runs without sample-level DP.
- **Dropout**: ``dropout`` is applied to the pooled features before the head, as in medfed's other networks; MONAI's
  per-dense-layer dropout stays off.
- **Transitions round up**: their 2x average pools use ``ceil_mode``, so a side that is not a multiple of 32 keeps its
  border instead of dropping it, and inputs down to :data:`MIN_SIDE` (17) px run (MONAI's needs 29: 28 px MedMNIST
  images would shrink to nothing). On sides that are multiples of 32 (64, 96, 128, 224 ...) the output equals
  MONAI's.
- **Layout** (:class:`~medfed.common.models.smallcnn.PooledClassifier`): ``encoder`` holds MONAI's ``features``
  (``conv0``, ``norm0``, ``relu0``, ``pool0``, ``denseblock1``, ``transition1``, ... ``denseblock4``) with the final
  norm and ReLU appended to the last dense block (``denseblock4.norm5``, ``denseblock4.relu5``), then ``pool`` and
  ``flatten``; ``head`` is MONAI's ``class_layers.out``. So the encoder's last weighted stage is ``denseblock4``:
  ``model.finetune=partial`` trains the last dense block (its final norm included) and the head, and Grad-CAM's
  default target is its activated output, the last spatial feature map. A MONAI state dict maps onto it by
  ``features.norm5`` -> ``encoder.denseblock4.norm5``, ``features.*`` -> ``encoder.*``, ``class_layers.out`` ->
  ``head`` (:func:`monai_key`); loading ImageNet DenseNet weights through ``model.pretrained`` is not supported.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from medfed.common.errors import ConfigError
from medfed.common.models.registry import register_model
from medfed.common.models.smallcnn import (
    MAX_GROUPS,
    FederatedBatchNorm2d,
    FederatedBatchNorm3d,
    PooledClassifier,
    check_model_args,
)

__all__ = ["BLOCK_CONFIG", "MIN_SIDE", "DenseNet121", "densenet121", "densenet_groups", "monai_key"]

logger = logging.getLogger(__name__)

BLOCK_CONFIG = (6, 12, 24, 16)
"""Dense layers per block of DenseNet-121."""
BOTTLENECK = 4
"""The 1x1 bottleneck of a dense layer has ``BOTTLENECK * growth_rate`` channels (MONAI's ``bn_size``)."""
MIN_SIDE = 17
"""The smallest spatial side :class:`DenseNet121` takes: the stem leaves ``ceil(side / 4)``, and the last transition's
2x pool needs at least 2 px (voxels) in, so the stem must leave 5."""


def densenet_groups(width: int, *, max_groups: int = MAX_GROUPS) -> int:
    """GroupNorm's group count for a DenseNet of ``width``: the largest divisor of ``width`` that is <= ``max_groups``
    (every normalised channel count is a multiple of ``width``, so the one count fits every norm)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"width={width!r} is out of range; it must be an int >= 1.")
    return max(g for g in range(1, min(width, max_groups) + 1) if width % g == 0)


def monai_key(key: str) -> str:
    """The name in :class:`DenseNet121`'s state dict of the entry ``key`` of a MONAI ``DenseNet121`` state dict
    (``features.norm5.weight`` -> ``encoder.denseblock4.norm5.weight``, ``class_layers.out.bias`` -> ``head.bias``).

    Raises:
        ValueError: ``key`` is not a MONAI DenseNet entry.
    """
    if key.startswith("features.norm5."):
        return "encoder.denseblock4." + key.removeprefix("features.")
    if key.startswith("features."):
        return "encoder." + key.removeprefix("features.")
    if key.startswith("class_layers.out."):
        return "head." + key.removeprefix("class_layers.out.")
    raise ValueError(f"{key!r} is not a key of a MONAI DenseNet state dict (features.* or class_layers.out.*).")


def _federated_batch_norms(module: nn.Module, spatial_dims: int) -> None:
    """Swap each of ``module``'s BatchNorms for medfed's, without the integer counter (same affine values)."""
    federated = FederatedBatchNorm2d if spatial_dims == 2 else FederatedBatchNorm3d
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, federated):
            swapped = federated(child.num_features)
            swapped.load_state_dict(child.state_dict(), strict=False)
            setattr(module, name, swapped)
        else:
            _federated_batch_norms(child, spatial_dims)


class DenseNet121(PooledClassifier):
    """MONAI's DenseNet-121 as a medfed classifier, 2D or 3D (see the module docstring): suits 64-128^3 volumes and
    128-512 px images (a 7x7 stride-2 stem and a max pool, 32x downsampling in all).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels, >= 1.
        n_classes: output logits, >= 2.
        width: growth rate ``k`` (the stem has ``2k`` features, the encoder ends with ``32k``); 32 is the classic.
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
        from monai.networks.nets import DenseNet121 as MonaiDenseNet121  # (lazy: importing MONAI takes seconds)

        monai_norm: str | tuple[str, dict[str, int]] = (
            ("group", {"num_groups": densenet_groups(width)}) if norm == "group" else "batch")
        net = MonaiDenseNet121(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=n_classes,
            init_features=2 * width,
            growth_rate=width,
            block_config=BLOCK_CONFIG,
            bn_size=BOTTLENECK,
            act=("relu", {"inplace": False}),
            norm=monai_norm,
            dropout_prob=0.0,
        )
        if norm == "batch":
            _federated_batch_norms(net, spatial_dims)
        head = net.class_layers.get_submodule("out")
        if not isinstance(head, nn.Linear):  # (MONAI's layout changed: this module would need updating)
            raise TypeError(f"MONAI's DenseNet121 has a {type(head).__name__} as class_layers.out, not a Linear.")
        avg_pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in net.features.named_children():
            if name.startswith("transition"):
                module.pool = avg_pool(kernel_size=2, stride=2, ceil_mode=True)
            if name == "norm5":  # the final norm and ReLU join the last dense block: its output is the last map
                last = layers[f"denseblock{len(BLOCK_CONFIG)}"]
                last.add_module("norm5", module)
                last.add_module("relu5", net.class_layers.get_submodule("relu"))
            else:
                layers[name] = module
        self._attach_head(layers, head.in_features, spatial_dims=spatial_dims, n_classes=n_classes, dropout=dropout)
        self.head = head  # MONAI's initialisation (zero bias)

    def _require_side(self, x: torch.Tensor) -> None:
        if x.ndim == self.spatial_dims + 2 and min(x.shape[2:]) < MIN_SIDE:
            raise ValueError(
                f"densenet121 got inputs of spatial shape {tuple(x.shape[2:])}; every side must be >= {MIN_SIDE} px "
                "(it downsamples 32x). Resize the images (dataset.size) or use model=smallcnn or resnet18."
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` of images ``(B, C, *spatial)``, every side >= :data:`MIN_SIDE`."""
        self._require_side(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, C, *spatial)``, every side >= :data:`MIN_SIDE`."""
        self._require_side(x)
        return self.head(self.dropout(self.encoder(x)))


@register_model("densenet121")
def densenet121(
    *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str = "group"
) -> nn.Module:
    """Factory of :class:`DenseNet121` for the model registry."""
    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, n_classes=n_classes, width=width,
                       dropout=dropout, norm=norm)
