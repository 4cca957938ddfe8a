"""Hydra's and OmegaConf's composition errors, said as medfed's: the key, the bad value and what is allowed."""

from __future__ import annotations

import logging
import typing
from collections.abc import Sequence
from enum import Enum

from medfed.common.config.checks import choice_error
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
    refused = _refused_choice(exc.__cause__)
    if refused is not None:
        return refused
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


def _refused_choice(cause: BaseException | None) -> ConfigError | None:
    """OmegaConf refused a value of an enum-typed field (``train.optimizer=lbfgs``): the same message as
    :func:`~medfed.common.config.checks.require_choice` gives, with the enum's values; None for other errors."""
    from omegaconf.errors import ValidationError

    if not isinstance(cause, ValidationError) or not cause.full_key or cause.object_type is None:
        return None
    if cause.value is None:  # `key=null`: not a choice, Hydra's own message says the field is not optional
        return None
    try:
        hint = typing.get_type_hints(cause.object_type).get(str(cause.full_key).rsplit(".", 1)[-1])
    except (NameError, TypeError):  # pragma: no cover - every schema's annotations resolve
        return None
    if not (isinstance(hint, type) and issubclass(hint, Enum)):
        return None
    return choice_error(str(cause.full_key), str(cause.value), [member.value for member in hint])
