"""Composition: the schemas in Hydra's ConfigStore, and ``key=value`` overrides composed into a validated Config."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable

from medfed.common.config.hydra_errors import explain_hydra_error
from medfed.common.config.private_recipes import with_private_recipe
from medfed.common.config.registry import CONF_DIR, GROUPS, schema_node_name
from medfed.common.config.renamed import renamed_overrides
from medfed.common.config.schema import Config
from medfed.common.errors import ConfigError

__all__ = ["compose_config", "register_schemas"]

logger = logging.getLogger(__name__)


_REGISTERED = threading.Lock(), [False]


def register_schemas() -> None:
    """Register the schemas in Hydra's ConfigStore once per process (idempotent; called by :func:`compose_config`).
    Storing them builds a structured config of every schema: about 0.1 s, once instead of at every composition."""
    from hydra.core.config_store import ConfigStore

    lock, done = _REGISTERED
    with lock:
        if done[0]:
            return
        store = ConfigStore.instance()
        store.store(name="medfed_schema", node=Config)
        for group in GROUPS.values():
            for option in group.options:
                store.store(group=group.name, name=schema_node_name(option), node=group.node(option))
        done[0] = True


_COMPOSED: dict[tuple[str, ...], Config] = {}


def compose_config(overrides: Iterable[str] = ()) -> Config:
    """Compose ``common/conf/config.yaml`` with ``key=value`` overrides into a validated :class:`Config`.

    Hydra costs 0.1-0.3 s per composition, and in simulation one process hosts the ServerApp or every virtual
    hospital, so results are kept per process (keyed by the overrides); each call returns its own copy.

    Raises:
        ConfigError: naming the key, the bad value and the allowed values, before anything starts.
    """
    key = tuple(renamed_overrides(overrides))
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(list(key))
    return copy.deepcopy(_COMPOSED[key])


def _compose(overrides: list[str]) -> Config:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for override in overrides:
        if "=" not in override:
            raise ConfigError(
                f"Override {override!r} is not of the form key=value (e.g. `train.rounds=20` or `dataset=medmnist`)."
            )
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="medfed"):
            cfg = compose(config_name="config", overrides=overrides)
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as exc:  # __post_init__ raised through OmegaConf, or a type conversion failed
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise explain_hydra_error(overrides, exc) from None
    except (HydraException, OmegaConfBaseException) as exc:
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, ConfigError):
            raise inner from None
        raise explain_hydra_error(overrides, exc) from None
    if not isinstance(obj, Config):  # pragma: no cover - guarded by the schema in config.yaml
        raise ConfigError("common/conf/config.yaml does not use the medfed schema.")
    return with_private_recipe(obj, overrides)
