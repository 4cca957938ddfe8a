"""The bridge to Flower's run config: both apps receive the same Hydra overrides and compose the same config."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from medfed.common.errors import ConfigError

__all__ = ["RUN_CONFIG_OVERRIDES", "overrides_from_run_config", "run_config_from_overrides"]

logger = logging.getLogger(__name__)

RUN_CONFIG_OVERRIDES = "medfed-overrides"
"""The run-config key that carries the Hydra overrides, a JSON list of ``key=value`` strings."""


def run_config_from_overrides(overrides: Sequence[str], **extra: str | int | float | bool) -> dict[str, Any]:
    """Flower run config carrying the Hydra overrides (a JSON list) plus scalar extras."""
    return {RUN_CONFIG_OVERRIDES: json.dumps(list(overrides)), **extra}


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a run config carries; an absent key means the defaults."""
    raw = run_config.get(RUN_CONFIG_OVERRIDES, "[]")
    try:
        overrides = json.loads(str(raw) or "[]")
    except json.JSONDecodeError:
        raise ConfigError(
            f"Run config key {RUN_CONFIG_OVERRIDES!r} is not a JSON list of key=value strings; "
            "launch runs with `medfed simulate` or `medfed train`."
        ) from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"Run config key {RUN_CONFIG_OVERRIDES!r} must be a JSON list of strings.")
    return overrides
