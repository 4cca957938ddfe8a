"""Typed configuration of medfed: schemas, validation, composition and the Flower run-config bridge.

The schema lives here as dataclasses registered in Hydra's ConfigStore; the values live in the YAML groups of
``common/conf``. ``compose_config(overrides)`` turns ``key=value`` strings into a validated :class:`Config`. Every
``__post_init__`` validates (never mutates) and raises :class:`~medfed.common.errors.ConfigError` naming the key,
the bad value and what is allowed.

Both Flower apps receive the same overrides through the run config (``RUN_CONFIG_OVERRIDES``) and compose the same
typed config from the same tree, so the ServerApp and every ClientApp agree on the recipe.

The package, one concept a module:

- schemas, one module per group: :mod:`.dataset`, :mod:`.model` (with ``personalize``), :mod:`.strategy`,
  :mod:`.federation`, :mod:`.train`, :mod:`.privacy`, :mod:`.evaluate` (with ``tracking``), :mod:`.ssl`, and the
  root :mod:`.schema`; the choices (``StrEnum`` types and their values) in :mod:`.choices`, the checks of one
  value in :mod:`.checks`;
- :mod:`.rules`: the named checks that involve several sections;
- :mod:`.registry`: the Hydra groups, their options and the schema of each;
- :mod:`.compose` and :mod:`.hydra_errors`: composition and the translation of Hydra's errors;
- :mod:`.serialize` and :mod:`.run_config`: a config as dict/YAML and back, and the run-config bridge.
"""

from __future__ import annotations

import logging

from medfed.common.config.choices import (
    ACCOUNTANTS,
    AMP_MODES,
    ATTACKS,
    CLASS_WEIGHTINGS,
    FINETUNE_MODES,
    GRAD_SAMPLE_MODES,
    LOCAL_LAYERS,
    LR_SCHEDULES,
    MODEL_NORMS,
    OPTIMIZERS,
    PARTITIONS,
    PRIVACY_MECHANISMS,
    SSL_METHODS,
    TASKS,
    Accountant,
    AmpMode,
    Attack,
    ClassWeighting,
    FinetuneMode,
    GradSampleMode,
    LRSchedule,
    LocalLayers,
    ModelNorm,
    Optimizer,
    Partition,
    PrivacyMechanism,
    SSLMethod,
    Task,
)
from medfed.common.config.compose import compose_config, register_schemas
from medfed.common.config.config_file import (
    override_key,
    overrides_with_config_file,
    read_config_file,
    write_config_file,
)
from medfed.common.config.dataset import DatasetConfig, FolderConfig, MedMNISTConfig, SyntheticConfig
from medfed.common.config.evaluate import EvaluateConfig, TrackingConfig
from medfed.common.config.federation import FederationConfig
from medfed.common.config.model import ModelConfig, PersonalizeConfig, ResNetConfig, ScatterNetConfig
from medfed.common.config.privacy import CentralDPConfig, DistributedDPConfig, DPConfig, PrivacyConfig
from medfed.common.config.registry import CONF_DIR
from medfed.common.config.run_config import RUN_CONFIG_OVERRIDES, overrides_from_run_config, run_config_from_overrides
from medfed.common.config.schema import Config
from medfed.common.config.serialize import config_from_dict, config_to_dict, config_to_yaml
from medfed.common.config.ssl import SSLConfig
from medfed.common.config.strategy import (
    AdaptiveMomentsConfig,
    KrumConfig,
    ProxConfig,
    ServerMomentumConfig,
    ServerOptimizerConfig,
    StrategyConfig,
    TrimmedMeanConfig,
)
from medfed.common.config.train import AugmentConfig, TrainConfig

__all__ = [
    "override_key",
    "overrides_with_config_file",
    "read_config_file",
    "write_config_file",
    "ACCOUNTANTS",
    "AMP_MODES",
    "ATTACKS",
    "CLASS_WEIGHTINGS",
    "CONF_DIR",
    "FINETUNE_MODES",
    "GRAD_SAMPLE_MODES",
    "LOCAL_LAYERS",
    "LR_SCHEDULES",
    "MODEL_NORMS",
    "OPTIMIZERS",
    "PARTITIONS",
    "PRIVACY_MECHANISMS",
    "RUN_CONFIG_OVERRIDES",
    "SSL_METHODS",
    "TASKS",
    "Accountant",
    "AdaptiveMomentsConfig",
    "AmpMode",
    "Attack",
    "AugmentConfig",
    "CentralDPConfig",
    "ClassWeighting",
    "Config",
    "DPConfig",
    "DistributedDPConfig",
    "DatasetConfig",
    "EvaluateConfig",
    "FederationConfig",
    "FinetuneMode",
    "FolderConfig",
    "GradSampleMode",
    "KrumConfig",
    "LRSchedule",
    "LocalLayers",
    "MedMNISTConfig",
    "ModelConfig",
    "ModelNorm",
    "Optimizer",
    "Partition",
    "PersonalizeConfig",
    "PrivacyConfig",
    "PrivacyMechanism",
    "ProxConfig",
    "ResNetConfig",
    "SSLConfig",
    "SSLMethod",
    "ScatterNetConfig",
    "ServerMomentumConfig",
    "ServerOptimizerConfig",
    "StrategyConfig",
    "SyntheticConfig",
    "Task",
    "TrackingConfig",
    "TrainConfig",
    "TrimmedMeanConfig",
    "compose_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "overrides_from_run_config",
    "register_schemas",
    "run_config_from_overrides",
]

logger = logging.getLogger(__name__)
