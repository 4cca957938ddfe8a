"""Schemas of the network and of which of its layers train or stay at a hospital: ``model``, ``personalize``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from medfed.common.config.checks import require_choice, require_fraction, require_positive
from medfed.common.config.choices import (
    FINETUNE_MODES,
    LOCAL_LAYERS,
    MODEL_NORMS,
    SCATTER_HEADS,
    FinetuneMode,
    LocalLayers,
    ModelNorm,
    ScatterHead,
)
from medfed.common.errors import ConfigError

__all__ = [
    "RESNET_STEMS",
    "ModelConfig",
    "PersonalizeConfig",
    "ResNetConfig",
    "ResNetStem",
    "ScatterNetConfig",
    "require_scatter_scale",
]

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which registered network to build; channels, classes and dimensionality come from the dataset."""

    name: str = "smallcnn"
    width: int = 32
    dropout: float = 0.0
    # transfer learning: a local weights file the coordinator starts the run from ('' = random initialisation), and
    # which layers train: full (all), partial (the encoder's last stage and the head), linear_probe (the head only)
    pretrained: str = ""
    finetune: FinetuneMode = FinetuneMode.full
    # normalisation after each convolution: group (GroupNorm; works with DP-SGD) | batch (BatchNorm; runs without DP)
    norm: ModelNorm = ModelNorm.group

    def __post_init__(self) -> None:
        require_positive("model.width", self.width)
        require_choice("model.norm", self.norm, MODEL_NORMS)
        require_fraction("model.dropout", self.dropout, low_open=False, high_open=True)
        require_choice("model.finetune", self.finetune, FINETUNE_MODES)
        if not isinstance(self.pretrained, str):
            raise ConfigError(f"model.pretrained={self.pretrained!r} must be a file path (or '' for none).")

    def factory_options(self) -> dict[str, object]:
        """Keyword arguments the model's factory takes beyond the shared ones (none for the CNNs)."""
        return {}


class ResNetStem(StrEnum):
    """The first layers of ``model=resnet18`` (``model.stem``): ``small`` (3x3 stride-1 convolution, no pool: keeps
    28-64 px images' resolution), ``imagenet`` (torchvision's 7x7 stride-2 convolution and 3x3 stride-2 max pool: the
    blocks see 1/4 of the side, and it is the stem ImageNet weights were trained with), ``auto`` (imagenet
    for images of 128 px or more when the model is built knowing the image size, else small)."""

    auto = "auto"
    small = "small"
    imagenet = "imagenet"


RESNET_STEMS: tuple[str, ...] = tuple(ResNetStem)


@dataclass
class ResNetConfig(ModelConfig):
    """``model=resnet18``: the shared options and ``stem`` (:class:`ResNetStem`). ImageNet weights
    (``medfed weights fetch torchvision:resnet18``) at 128-512 px: ``model.stem=imagenet model.width=64``; their 7x7
    stem kernel then loads as is instead of being shrunk to 3x3."""

    name: str = "resnet18"
    stem: ResNetStem = ResNetStem.auto

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("model.stem", self.stem, RESNET_STEMS)

    def factory_options(self) -> dict[str, object]:
        return {"stem": str(self.stem)}


def require_scatter_scale(scatter_j: int, side: int) -> None:
    """Raise :class:`ConfigError` (naming the largest J that fits) unless images of ``side`` pixels exceed 2^J, as
    the scattering transform needs."""
    if side > 2**scatter_j:
        return
    largest = 0
    while 2 ** (largest + 1) < side:
        largest += 1
    raise ConfigError(
        f"model.scatter_j={scatter_j} is too large for {side} px images: the image side must exceed 2^J = "
        f"{2**scatter_j}. Use model.scatter_j <= {largest}, or larger images."
    )


@dataclass
class ScatterNetConfig(ModelConfig):
    """``model=scatternet``: a fixed wavelet-scattering front end (kymatio's 2D scattering, ``scatter_j`` scales and
    ``scatter_l`` orientations; volumes slice by slice) and a small trainable ``head`` (``linear`` over the
    coefficients average-pooled to a ``pool`` grid, or a ``cnn`` of two ``width``-channel convolutions). The front end
    has no weights and reads no data statistics, so a hospital computes its features once and only the head trains
    (privacy-cheap features: Tramer and Boneh, ICLR 2021)."""

    name: str = "scatternet"
    head: ScatterHead = ScatterHead.linear
    scatter_j: int = 2
    scatter_l: int = 8
    pool: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("model.head", self.head, SCATTER_HEADS)
        for key, low, high in (("scatter_j", 1, 6), ("scatter_l", 1, 16), ("pool", 1, 16)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"model.{key}={value!r} is out of range; it must be an integer in [{low}, {high}].")
        refused = [f"{key}={value!r}" for key, value, default in (
            ("model.pretrained", self.pretrained, ""), ("model.finetune", str(self.finetune), "full"),
            ("model.norm", str(self.norm), "group")) if value != default]
        if refused:
            raise ConfigError(
                f"model=scatternet does not take {', '.join(refused)}: its front end is a fixed wavelet transform "
                "(nothing to pretrain or freeze) and its head normalises with GroupNorm. Leave model.pretrained='', "
                "model.finetune=full and model.norm=group, or use model=smallcnn / model=resnet18 for transfer "
                "learning."
            )

    def factory_options(self) -> dict[str, object]:
        return {"head": str(self.head), "scatter_j": self.scatter_j, "scatter_l": self.scatter_l, "pool": self.pool}


@dataclass
class PersonalizeConfig:
    """Personalisation: layers each hospital keeps to itself (FedBN-style norm layers, FedPer-style head) and local
    fine-tuning of the final model; hospitals then report global and personalised metrics."""

    local_layers: LocalLayers = LocalLayers.none
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        require_choice("personalize.local_layers", self.local_layers, LOCAL_LAYERS)
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ConfigError(
                f"personalize.finetune_epochs={self.finetune_epochs!r} is out of range; it must be an integer >= 0 "
                "(0: no local fine-tuning)."
            )

    @property
    def enabled(self) -> bool:
        return self.local_layers != "none" or self.finetune_epochs > 0
