"""Schemas of the network and of which of its layers train or stay at a hospital: ``model``, ``personalize``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medfed.common.config.checks import require_choice, require_fraction, require_positive
from medfed.common.config.choices import (
    FINETUNE_MODES,
    LOCAL_LAYERS,
    MODEL_NORMS,
    FinetuneMode,
    LocalLayers,
    ModelNorm,
)
from medfed.common.errors import ConfigError

__all__ = [
    "ModelConfig",
    "PersonalizeConfig",
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
