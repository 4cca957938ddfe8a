"""Hydra's and OmegaConf's composition errors, said as medfed's: the key, the bad value and what is allowed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from medfed.common.config.registry import GROUPS, group_options
from medfed.common.errors import ConfigError

__all__ = ["explain_hydra_error"]

logger = logging.getLogger(__name__)


def explain_hydra_error(overrides: Sequence[str], exc: Exception) -> ConfigError:
    """The :class:`ConfigError` that explains ``exc``, raised while composing ``overrides``."""
    text = str(exc).strip()
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        if "." not in group and group in GROUPS and value and f"{group}/{value}" in text:
            return ConfigError(
                f"{group}={value!r} is not a known {group} option; choose one of: "
                f"{', '.join(group_options(group))}."
            )
    if "Could not override" in text or "not in struct" in text:
        key = text.split("'")[1] if text.count("'") >= 2 else text
        return ConfigError(
            f"{key!r} is not a key of the medfed config (a typo, or a key of another group option). "
            "`medfed config show` lists every key with its current value."
        )
    cause = exc.__cause__
    if cause is not None and "could not be converted" in str(cause):
        detail = str(cause).splitlines()[0]
        full_key = next((ln.split(":", 1)[1].strip() for ln in str(cause).splitlines() if "full_key:" in ln), "")
        return ConfigError(
            f"{full_key}: {detail}; give a value of that type (`medfed config show` shows the current one)."
        )
    detail = f" ({str(cause).splitlines()[0]})" if cause is not None else ""
    return ConfigError(f"Invalid configuration: {text.splitlines()[0]}{detail}")
