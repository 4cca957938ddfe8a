"""The Hydra groups of the config: the options of each, the schema each option composes into, looked up by name.

A group option ``strategy=fedyogi`` is the YAML file ``common/conf/strategy/fedyogi.yaml``, whose defaults list
names the schema registered here for it (``fedyogi_schema``, an :class:`AdaptiveMomentsConfig` whose ``name`` is
``fedyogi``). The same table rebuilds a section from a plain dict (:func:`~medfed.common.config.config_from_dict`):
the section's selector field (``strategy.name``, ``dataset.source``, ``privacy.name``) names its schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from medfed.common.config.dataset import FolderConfig, MedMNISTConfig, SyntheticConfig
from medfed.common.config.federation import FederationConfig
from medfed.common.config.model import ModelConfig, ResNetConfig, ScatterNetConfig
from medfed.common.config.privacy import CentralDPConfig, DistributedDPConfig, DPConfig, PrivacyConfig
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
from medfed.common.errors import ConfigError

__all__ = ["CONF_DIR", "GROUPS", "SchemaGroup", "group_options", "schema_node_name"]

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra tree: ``config.yaml`` and one folder of YAML options per group (package data of ``medfed.common``)."""


@dataclass(frozen=True)
class SchemaGroup:
    """One Hydra group: the schema of each of its options, and the field of the section that names the option."""

    name: str  # the group, e.g. "strategy"
    options: Mapping[str, type[Any]]  # group option (its YAML file's stem) -> schema
    selector: str | None = None  # the field set to the option's name (strategy.name); None: no such field
    what: str = ""  # what the selector's values are called in errors, e.g. "strategy", "dataset source"

    def node(self, option: str) -> Any:
        """What the ConfigStore holds for ``option``: its schema (an OmegaConf structured config, not validated: a
        schema's defaults need not be a valid section, e.g. ``dataset=folder`` without folders), with the selector
        field set to the option."""
        from omegaconf import OmegaConf

        node = OmegaConf.structured(self.schema(option))
        if self.selector:
            node[self.selector] = option
        return node

    def schema(self, option: str) -> type[Any]:
        """The schema of ``option``.

        Raises:
            ConfigError: ``option`` is not one of this group's options (the message lists them).
        """
        try:
            return self.options[option]
        except KeyError:
            key = f"{self.name}.{self.selector}" if self.selector else self.name
            raise ConfigError(
                f"{key}={option!r} is not a known {self.what or self.name + ' option'}; choose one of: "
                f"{', '.join(sorted(self.options))}."
            ) from None

    def from_dict(self, section: Mapping[str, Any]) -> Any:
        """The section rebuilt (and validated) with its schema: the only one, or the one its selector names.

        Raises:
            ConfigError: the selector names no option of this group, or the section has keys its schema lacks.
        """
        schemas = set(self.options.values())
        if len(schemas) == 1 or self.selector is None:
            (schema,) = schemas
        else:
            schema = self.schema(str(section.get(self.selector, "")))
        unknown = sorted(set(section) - {f.name for f in fields(schema)})
        if unknown:
            raise ConfigError(
                f"{self.name} section has key(s) {', '.join(unknown)} that its schema {schema.__name__} does not "
                f"have; rebuild it from config_to_dict output of a composed config."
            )
        return schema(**section)


_STRATEGIES: dict[str, type[StrategyConfig]] = {
    "fedavg": StrategyConfig,
    "fedmedian": StrategyConfig,
    "fedprox": ProxConfig,
    "fedtrimmedavg": TrimmedMeanConfig,
    "krum": KrumConfig,
    "multikrum": KrumConfig,
    "fedavgm": ServerMomentumConfig,
    "fedadagrad": ServerOptimizerConfig,
    "fedadam": AdaptiveMomentsConfig,
    "fedyogi": AdaptiveMomentsConfig,
}

GROUPS: Mapping[str, SchemaGroup] = MappingProxyType({
    "dataset": SchemaGroup("dataset", {"folder": FolderConfig, "medmnist": MedMNISTConfig,
                                       "synthetic": SyntheticConfig}, selector="source", what="dataset source"),
    "model": SchemaGroup("model", {"densenet121": ModelConfig, "resnet18": ResNetConfig, "scatternet": ScatterNetConfig,
                                   "smallcnn": ModelConfig}, selector="name"),
    "strategy": SchemaGroup("strategy", _STRATEGIES, selector="name", what="strategy"),
    "federation": SchemaGroup("federation", {"default": FederationConfig}),
    "train": SchemaGroup("train", {"default": TrainConfig}),
    "privacy": SchemaGroup("privacy", {"none": PrivacyConfig, "dp": DPConfig, "central_dp": CentralDPConfig,
                                      "distributed_dp": DistributedDPConfig},
                           selector="name", what="privacy mechanism"),
})
"""Every Hydra group by name. Adding an option: its YAML file, and its schema here."""


def schema_node_name(option: str) -> str:
    """The ConfigStore name of an option's schema, as the option's YAML defaults list names it."""
    return f"{option}_schema"


def group_options(group: str) -> list[str]:
    """The options of a Hydra group, sorted: the YAML files in its folder."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
