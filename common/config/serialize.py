"""A composed :class:`Config` as a plain dict or YAML, and back (validated again), without Hydra."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from enum import Enum
from typing import Any

from medfed.common.config.evaluate import EvaluateConfig, TrackingConfig
from medfed.common.config.model import PersonalizeConfig
from medfed.common.config.registry import GROUPS
from medfed.common.config.schema import Config
from medfed.common.config.ssl import SSLConfig
from medfed.common.config.train import AugmentConfig

__all__ = ["config_from_dict", "config_to_dict", "config_to_yaml"]

logger = logging.getLogger(__name__)


def config_to_yaml(cfg: Config) -> str:
    """Render a composed config as YAML (what the run directory keeps as ``config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-dict form of a composed config (JSON-serialisable): the choices are plain strings, not enum members."""
    return asdict(cfg, dict_factory=_plain_dict)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`config_to_dict` output, validating every section again.

    Cheap (no Hydra): used to keep a node's composed config in Flower's ``context.state`` between messages. A
    group's section gets the schema its selector names (``strategy.name``, ``dataset.source``, ``privacy.name``).

    Raises:
        ConfigError: a bad value, or a section whose selector names no option of its group (listing the choices).
    """
    train = dict(data["train"])
    train["augment"] = AugmentConfig(**train["augment"])
    return Config(
        dataset=GROUPS["dataset"].from_dict(data["dataset"]),
        model=GROUPS["model"].from_dict(data["model"]),
        strategy=GROUPS["strategy"].from_dict(data["strategy"]),
        federation=GROUPS["federation"].from_dict(data["federation"]),
        train=GROUPS["train"].from_dict(train),
        privacy=GROUPS["privacy"].from_dict(data["privacy"]),
        personalize=PersonalizeConfig(**data.get("personalize", {})),
        evaluate=EvaluateConfig(**data.get("evaluate", {})),
        tracking=TrackingConfig(**data.get("tracking", {})),
        task=data.get("task", "classify"),
        ssl=SSLConfig(**data.get("ssl", {})),
    )
