"""The root schema, :class:`Config`: one run's whole typed configuration, its sections and the task."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from medfed.common.config.checks import require_choice, require_fraction
from medfed.common.config.choices import TASKS, Task
from medfed.common.config.dataset import DatasetConfig
from medfed.common.config.evaluate import EvaluateConfig, TrackingConfig
from medfed.common.config.federation import FederationConfig
from medfed.common.config.model import ModelConfig, PersonalizeConfig
from medfed.common.config.privacy import PrivacyConfig
from medfed.common.config.rules import check_rules
from medfed.common.config.ssl import SSLConfig
from medfed.common.config.strategy import StrategyConfig
from medfed.common.config.train import TrainConfig

__all__ = ["Config"]

logger = logging.getLogger(__name__)


@dataclass
class Config:
    """The whole typed configuration of one medfed run.

    Each section validates itself; then the task and the label fraction are checked here, and every cross-section
    rule of :mod:`medfed.common.config.rules` in turn.
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # classify: supervised; ssl: self-supervised pretraining of the encoder (no labels; its best_model.pt starts a
    # supervised run through model.pretrained=...)
    task: Task = Task.classify
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def __post_init__(self) -> None:
        require_choice("task", self.task, TASKS)
        require_fraction("dataset.label_fraction", self.dataset.label_fraction)
        check_rules(self)
