"""The Hydra groups of the config: where their YAML options live and which schema each option composes into."""

from __future__ import annotations

import logging
from pathlib import Path

from medfed.common.config.dataset import FolderConfig, MedMNISTConfig, SyntheticConfig
from medfed.common.config.federation import FederationConfig
from medfed.common.config.model import ModelConfig
from medfed.common.config.privacy import CentralDPConfig, DPConfig, PrivacyConfig
from medfed.common.config.strategy import (
    AdaptiveMomentsConfig,
    KrumConfig,
    ProxConfig,
    ServerMomentumConfig,
    ServerOptimizerConfig,
    StrategyConfig,
    TrimmedMeanConfig,
)
from medfed.common.config.train import TrainConfig

__all__ = ["CONF_DIR", "SCHEMAS", "group_options"]

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra tree: ``config.yaml`` and one folder of YAML options per group (package data of ``medfed.common``)."""

SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"medmnist": MedMNISTConfig, "synthetic": SyntheticConfig, "folder": FolderConfig},
    "model": {"base": ModelConfig},
    "strategy": {"base": StrategyConfig, "prox": ProxConfig, "trimmed_mean": TrimmedMeanConfig, "krum": KrumConfig,
                 "server_momentum": ServerMomentumConfig,
                 "server_optimizer": ServerOptimizerConfig, "adaptive_moments": AdaptiveMomentsConfig},
    "federation": {"base": FederationConfig},
    "train": {"base": TrainConfig},
    "privacy": {"none": PrivacyConfig, "dp": DPConfig, "central_dp": CentralDPConfig},
}


def group_options(group: str) -> list[str]:
    """The options of a Hydra group, sorted: the YAML files in its folder."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
