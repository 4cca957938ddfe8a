"""The coordinator directory as the deployment commands see it: its settings (``coordinator.json``), the
:class:`~medfed.server.coordinator.Coordinator` they describe, and launching a run of this installation's app
bundle on it."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from medfed.common.errors import ConfigError

if TYPE_CHECKING:
    from medfed.common.config import Config
    from medfed.server.coordinator import Coordinator

__all__ = ["CoordDir", "LaunchedRun", "deployment_run_config", "launch_run", "open_coordinator", "save_settings"]

logger = logging.getLogger(__name__)

CoordDir = Annotated[Path, typer.Option("--dir", help="The coordinator directory (certificates, state, runs).")]


class LaunchedRun(NamedTuple):
    """A run submitted to the coordinator: its Flower run id, its run directory and the config it composed."""

    run_id: int
    run_dir: Path
    cfg: Config


def open_coordinator(directory: Path) -> Coordinator:
    """The coordinator a directory's ``coordinator.json`` describes."""
    from medfed.server.coordinator import Coordinator

    settings = Path(directory) / "coordinator.json"
    if not settings.is_file():
        raise ConfigError(
            f"{directory} is not a coordinator directory; create it with `medfed coordinator init`, or start with "
            "`medfed coordinator start --dir DIR --tls-dir FOLDER` when the certificates were made elsewhere."
        )
    values = json.loads(settings.read_text(encoding="utf-8"))
    return Coordinator(directory, address=values["address"], insecure=bool(values.get("insecure", False)),
                       tls_dir=values.get("tls_dir"))


def check_listen_address(address: str) -> None:
    """Refuse (ConfigError) a SuperLink address that is not ``host:port`` before anything is written or started."""
    from medfed.common.errors import ConfigError
    from medfed.common.processes import split_address

    try:
        split_address(address, host_required=False)
    except ValueError as exc:
        raise ConfigError(f"--address: {exc}; 0.0.0.0:PORT listens on every interface.") from None


def save_settings(directory: Path, address: str, insecure: bool, tls_dir: Path | None = None) -> None:
    """Write ``coordinator.json``: where the SuperLink listens, with or without TLS, and its certificates' folder."""
    from medfed.common.atomic import atomic_write

    check_listen_address(address)
    settings = {"address": address, "insecure": insecure}
    if tls_dir is not None:
        settings["tls_dir"] = str(Path(tls_dir).resolve())
    with atomic_write(Path(directory) / "coordinator.json", binary=False) as handle:
        json.dump(settings, handle, indent=2)


def deployment_run_config(
    run_path: Path, *, resume: bool, names: dict[int, str]
) -> dict[str, str | int | float | bool]:
    """The run config keys a deployment run gets beside its overrides (each must be declared in the app bundle's
    pyproject, or Flower refuses the run)."""
    from medfed.common import keys

    return {keys.RUN_DIR: str(run_path), keys.RUN_MODE: "deployment", keys.RUN_RESUME: resume,
            keys.RUN_T0: time.time(), keys.RUN_NODE_NAMES: json.dumps({str(k): v for k, v in names.items()})}


def launch_run(
    directory: Path, overrides: list[str], run_dir: Path | None, *, resume: bool = False,
    note: dict[str, Any] | None = None,
) -> LaunchedRun:
    """Launch a training run of this installation's app bundle on the coordinator."""
    from medfed.cli.bundle import staged_app
    from medfed.common.config import compose_config, run_config_from_overrides
    from medfed.server.runs import RunDirectory

    coordinator = open_coordinator(directory)
    cfg = compose_config(overrides)  # bad overrides fail here, before anything is submitted
    run_path = (run_dir or coordinator.runs_dir / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
    if not resume and RunDirectory(run_path).metrics_path.exists():
        raise ConfigError(f"--run-dir {run_path} already holds a run; choose another or pass --resume.")
    names = {node: entry["name"] for node, entry in coordinator.node_names().items()}
    run_config = run_config_from_overrides(overrides, **deployment_run_config(run_path, resume=resume, names=names))
    with staged_app() as app_dir:
        run_id = coordinator.launch(app_dir, run_config, note=note)
    return LaunchedRun(run_id, run_path, cfg)
