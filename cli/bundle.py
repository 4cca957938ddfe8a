"""medfed's Flower app bundle (FAB): built the same way from the installed code at the coordinator and at a site.

The bundle holds the ``medfed`` package's app parts (``medfed.client``, ``medfed.common``, ``medfed.server``,
``medfed.strategies``: Python sources and the Hydra config tree, laid out as ``medfed/client/...``) and a fixed
``pyproject.toml``. The components are ``medfed.server.app:app`` and ``medfed.client.app:app``; a process that has
already imported ``medfed`` (a hospital's gate does) runs its own installation's code, never the bundle's copy.
Flower writes FABs with fixed timestamps, so two machines with the same medfed release build byte-identical
bundles: a hospital approves the sha256 that ``medfed hospital approve`` computes from its own installation, and the
coordinator's ``medfed train`` submits exactly that bundle.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from medfed.common import keys
from medfed.common.environment import APP_SECTION
from medfed.common.config import RUN_CONFIG_OVERRIDES

__all__ = ["APP_PACKAGES", "bundle_hash", "staged_app"]

logger = logging.getLogger(__name__)

APP_PACKAGES = ("client", "common", "server", "strategies")
_SUFFIXES = (".py", ".yaml")

_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "medfed"
version = "{version}"
description = "medfed's Flower app: the coordinator's ServerApp and the hospitals' ClientApp."
license = "Apache-2.0"
dependencies = []  # a site never installs packages at run time: the app runs on the site's own medfed install

{app_section}
"{overrides}" = "[]"
"{run_dir}" = "runs/deployment"
"{mode}" = "deployment"
"{resume}" = false
"{t0}" = 0.0
"{node_names}" = "{{}}"
"""


def _medfed_version() -> str:
    try:
        return version("medfed")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


@contextmanager
def staged_app() -> Iterator[Path]:
    """A temporary app directory holding exactly what goes into the bundle."""
    with tempfile.TemporaryDirectory(prefix="medfed-fab-") as tmp:
        root = Path(tmp)
        namespace = Path(importlib.import_module("medfed").__file__ or "")
        (root / "medfed").mkdir()
        shutil.copyfile(namespace, root / "medfed" / namespace.name)
        for package in APP_PACKAGES:
            source = Path(importlib.import_module(f"medfed.{package}").__file__ or "").parent
            for path in sorted(source.rglob("*")):
                if path.is_file() and path.suffix in _SUFFIXES and "__pycache__" not in path.parts:
                    target = root / "medfed" / package / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
        (root / "pyproject.toml").write_text(
            _PYPROJECT.format(version=_medfed_version(), app_section=APP_SECTION, overrides=RUN_CONFIG_OVERRIDES, run_dir=keys.RUN_DIR,
                              mode=keys.RUN_MODE, resume=keys.RUN_RESUME, t0=keys.RUN_T0,
                              node_names=keys.RUN_NODE_NAMES),
            encoding="utf-8",
        )
        yield root


def bundle_hash() -> str:
    """The sha256 of the bundle this installation builds (what a hospital puts in ``approved_apps``)."""
    from flwr.cli.build import build_fab_from_disk

    with staged_app() as app:
        return hashlib.sha256(build_fab_from_disk(app)).hexdigest()
