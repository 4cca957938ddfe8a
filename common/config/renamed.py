"""Config keys that were renamed: old names still work for a while, with a deprecation message.

One name for a hospital's data path everywhere: ``data_path`` in site.yaml, ``--data-path`` on the command line,
``dataset.data_path`` (the folder of MedMNIST files) and ``dataset.data_paths`` (one folder per simulated
hospital) in the config.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType

__all__ = ["RENAMED_KEYS", "renamed_overrides"]

logger = logging.getLogger(__name__)

RENAMED_KEYS: Mapping[str, str] = MappingProxyType({
    "dataset.root": "dataset.data_path",
    "dataset.roots": "dataset.data_paths",
    "dataset.test_root": "dataset.test_data_path",
})
"""Old override key -> its name now."""


def renamed_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides with old key names replaced by their new ones (each old name warns once per call)."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        prefix = key[: len(key) - len(key.lstrip("+~"))]  # Hydra's append (+) and delete (~) markers
        new = RENAMED_KEYS.get(key[len(prefix):])
        if new is not None and sep:
            message = (f"{key[len(prefix):]} is deprecated and will be removed; it is now {new} "
                       f"(write {prefix}{new}={value}).")
            # FutureWarning: the deprecation a user (not only a developer) should see, once per process and place
            warnings.warn(message, FutureWarning, stacklevel=3)
            override = f"{prefix}{new}{sep}{value}"
        out.append(override)
    return out
