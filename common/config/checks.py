"""Checks of one value, shared by every schema's ``__post_init__``.

Each raises :class:`~medfed.common.errors.ConfigError` naming the key, the bad value and what is allowed, so a typo
fails before anything starts and says how to fix it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from medfed.common.errors import ConfigError

__all__ = [
    "DEVICE_SPEC",
    "choice_error",
    "require_choice",
    "require_count",
    "require_device_spec",
    "require_fraction",
    "require_positive",
]

logger = logging.getLogger(__name__)

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
"""The devices a site or a recipe may name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""


def require_choice(key: str, value: object, allowed: Sequence[object]) -> None:
    """``value`` must be one of ``allowed``; the error lists them and shows the first as an example."""
    if value not in allowed:
        raise choice_error(key, value, allowed)


def choice_error(key: str, value: object, allowed: Sequence[object]) -> ConfigError:
    """The error for ``key=value`` when ``value`` is not one of ``allowed``."""
    return ConfigError(
        f"{key}={value!r} is not allowed; choose one of: {', '.join(str(a) for a in allowed)} "
        f"(e.g. `{key}={allowed[0]}` on the command line)."
    )


def require_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is out of range; it must be a finite number {bound}.")


def require_fraction(key: str, value: float, *, low_open: bool = True, high_open: bool = False) -> None:
    """A number in the unit interval, (0, 1] unless told which ends are open."""
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {lo}, {hi}.")


def require_count(key: str, value: object, *, minimum: int, meaning: str) -> None:
    """An int that is 0 (off) or at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < minimum):
        raise ConfigError(f"{key}={value!r} is out of range; it must be 0 (off) or an integer >= {minimum} ({meaning}).")


def require_device_spec(key: str, value: object) -> None:
    """A device name: ``auto`` (a GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or not DEVICE_SPEC.match(value):
        raise ConfigError(f"{key}={value!r} is not a device; use auto (a GPU when there is one, else the CPU), cpu, "
                          "cuda or cuda:N (N: the GPU's index, e.g. cuda:1).")
