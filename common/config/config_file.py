"""Recipes kept in a file: ``--config-file FILE`` of `medfed simulate`, `medfed baseline ...` and `medfed train`.

A config file is a YAML (or JSON) list of Hydra overrides, or a mapping whose ``overrides`` key holds that list; the
best recipe `medfed tune` writes has that form, and so has a run directory's ``overrides.json``. The file's overrides
come first and the command line's after them, so an override given on the command line wins. Comments in the file
are the place to say where the recipe came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from medfed.common.errors import ConfigError

__all__ = ["override_key", "overrides_with_config_file", "read_config_file", "write_config_file"]


def override_key(override: str) -> str:
    """The key an override sets (``train.lr`` of ``+train.lr=0.1``; Hydra's append and delete markers dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def read_config_file(path: Path) -> list[str]:
    """The overrides a config file holds (checked to be ``key=value`` strings)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config-file {path}: no such file. Give the path of a recipe file (for example the "
                          "best.yaml `medfed tune` wrote).") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config-file {path} could not be read as YAML ({type(exc).__name__}); it must be a list "
                          "of key=value overrides, or a mapping with an `overrides:` list.") from None
    if isinstance(data, dict):
        unknown = sorted(str(k) for k in data if k != "overrides")
        if unknown:
            raise ConfigError(f"--config-file {path} has the keys {unknown}; a recipe file has only `overrides:` (a "
                              "list of key=value strings). Move each setting into that list, e.g. - train.lr=0.01")
        data = data.get("overrides")
    if not isinstance(data, list) or not all(isinstance(o, str) and "=" in o for o in data):
        raise ConfigError(f"--config-file {path} must hold a list of key=value overrides (e.g. - train.lr=0.01), "
                          "alone or under `overrides:`; found something else.")
    return list(data)


def overrides_with_config_file(config_file: Path | None, overrides: Sequence[str] | None) -> list[str]:
    """The file's overrides, then the command line's (the later wins in Hydra)."""
    return [*(read_config_file(config_file) if config_file is not None else []), *(overrides or [])]


def write_config_file(path: Path, overrides: Sequence[str], comment: str) -> None:
    """Write a recipe file: ``comment`` (each line as a YAML comment), then ``overrides:``."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    body = yaml.safe_dump({"overrides": list(overrides)}, sort_keys=False, default_flow_style=False, width=1000)
    Path(path).write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
