"""A composed :class:`Config` as a plain dict or YAML, and back (validated again), without Hydra."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from medfed.common.config.evaluate import EvaluateConfig, TrackingConfig
from medfed.common.config.federation import FederationConfig
from medfed.common.config.model import ModelConfig, PersonalizeConfig
from medfed.common.config.registry import SCHEMAS
from medfed.common.config.schema import Config
from medfed.common.config.ssl import SSLConfig
from medfed.common.config.strategy import StrategyConfig
from medfed.common.config.train import AugmentConfig, TrainConfig
from medfed.common.errors import ConfigError

__all__ = ["config_from_dict", "config_to_dict", "config_to_yaml"]

logger = logging.getLogger(__name__)


def config_to_yaml(cfg: Config) -> str:
    """Render a composed config as YAML (what the run directory keeps as ``config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-dict form of a composed config (JSON-serialisable)."""
    return asdict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`config_to_dict` output, validating every section again.

    Cheap (no Hydra): used to keep a node's composed config in Flower's ``context.state`` between messages.
    """
    train = dict(data["train"])
    train["augment"] = AugmentConfig(**train["augment"])
    return Config(
        dataset=_option_from_dict("dataset", "source", "dataset source", data["dataset"]),
        model=ModelConfig(**data["model"]),
        strategy=_strategy_from_dict(data["strategy"]),
        federation=FederationConfig(**data["federation"]),
        train=TrainConfig(**train),
        privacy=_option_from_dict("privacy", "name", "privacy mechanism", data["privacy"]),
        personalize=PersonalizeConfig(**data.get("personalize", {})),
        evaluate=EvaluateConfig(**data.get("evaluate", {})),
        tracking=TrackingConfig(**data.get("tracking", {})),
        task=data.get("task", "classify"),
        ssl=SSLConfig(**data.get("ssl", {})),
    )


def _strategy_from_dict(section: Mapping[str, Any]) -> StrategyConfig:
    """The strategy section with the schema of its options (the base one for strategies without options)."""
    extra = set(section) - {f.name for f in fields(StrategyConfig)}
    for schema in SCHEMAS["strategy"].values():  # the option schemas registered for the Hydra group
        if extra and extra <= {f.name for f in fields(schema)}:
            return schema(**section)
    return StrategyConfig(**section)


def _option_from_dict(group: str, key: str, what: str, section: Mapping[str, Any]) -> Any:
    """A group with one schema per option: the schema its ``key`` field names, filled from ``section``."""
    schema = SCHEMAS[group].get(section.get(key, ""))
    if schema is None:
        raise ConfigError(f"{group}.{key}={section.get(key)!r} is not a known {what}.")
    return schema(**section)
