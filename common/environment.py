"""The process environment every medfed process sets before Flower starts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["APP_SECTION", "flower_environment", "script", "software_versions"]

# the Flower app section of every medfed app directory: the simulation's (medfed.simulation.launcher) and the
# deployment bundle's (medfed.cli.bundle)
APP_SECTION = """[tool.flwr.app]
publisher = "medfed"

[tool.flwr.app.components]
serverapp = "medfed.server.app:app"
clientapp = "medfed.client.app:app"

[tool.flwr.app.config]"""


def flower_environment() -> None:
    """No telemetry, no update checks, no Ray usage stats, prompt SuperExec polling (set unless the user set them
    already).

    Flower starts its helper processes (``flower-superexec``, ``flwr-serverapp``, ...) by name: this
    environment's scripts folder goes first on ``PATH`` so they are the ones installed beside medfed.
    """
    scripts = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Flower's SuperExec looks for a new task (a message for a ClientApp, a run for a ServerApp) every 1 s by
    # default; a local check every 0.2 s costs nothing and takes ~0.4 s off every message's latency.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")


def script(name: str) -> str:
    """The path of a console script installed beside this interpreter (medfed's, Flower's), else from PATH."""
    from medfed.common.errors import ConfigError

    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed in this environment; reinstall medfed (pip install medfed).")
    return found


def software_versions() -> dict[str, str]:
    """The versions a run's results depend on (Python, platform, medfed's main packages; absent ones: '-')."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("medfed", "flwr", "torch", "monai", "opacus", "numpy", "pydicom"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "-"
    return versions
