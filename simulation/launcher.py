"""Launch a federation in Flower's simulation runtime (one virtual SuperNode per hospital).

The run config carries the Hydra overrides, so the ServerApp and every ClientApp compose the same typed config.
Flower's public ``run_simulation`` cannot carry a run config, so this launches the runtime the way Flower's own
``flwr-simulation`` process does: a ``Run`` whose app directory holds the run config as the app's defaults.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medfed.common import keys
from medfed.common.config import Config, run_config_from_overrides
from medfed.common.environment import APP_SECTION, flower_environment

__all__ = ["run_simulation"]

logger = logging.getLogger(__name__)

_APP_TOML = """[project]
name = "medfed-simulation"
version = "1.0.0"

{app_section}
{config}
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_app_dir(directory: Path, run_config: Mapping[str, Any]) -> None:
    body = "\n".join(f'"{key}" = {_toml_value(value)}' for key, value in run_config.items())
    (directory / "pyproject.toml").write_text(_APP_TOML.format(app_section=APP_SECTION, config=body), encoding="utf-8")


def run_simulation(
    cfg: Config,
    overrides: Sequence[str],
    run_dir: Path,
    *,
    resume: bool = False,
    cache_dir: Path,
    state_dir: Path,
    t0: float | None = None,
    verbose: bool = False,
) -> None:
    """Run the ServerApp and ``federation.hospitals`` ClientApps in Flower's simulation runtime (blocking)."""
    flower_environment()
    cores = os.cpu_count() or 1
    parallel = max(1, min(cfg.federation.parallel, cfg.federation.hospitals))
    init_args: dict[str, Any] = {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False}
    backend_config = {
        "client_resources": {"num_cpus": max(1, cores // parallel), "num_gpus": 0.0},
        "init_args": init_args,
    }
    extras: dict[str, str | int | float | bool] = {
            keys.RUN_DIR: str(run_dir.resolve()),
            keys.RUN_MODE: "simulation",
            keys.RUN_RESUME: resume,
            keys.RUN_T0: float(t0 if t0 is not None else time.time()),
            keys.RUN_CACHE_DIR: str(cache_dir.resolve()),
            keys.RUN_STATE_DIR: str(state_dir.expanduser().resolve()),
    }
    run_config = run_config_from_overrides(overrides, **extras)
    # Ray's ~2 s start overlaps the imports of Flower, torch and the apps
    with _ray_started_early(init_args) as ray_ready:
        from flwr.app import Context, RecordDict
        from flwr.simulation.run_simulation import _run_simulation

        from medfed.client.app import app as client_app
        from medfed.server.app import app as server_app

        flwr_logger = logging.getLogger("flwr")  # Flower sets its own level and handler on import
        flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        flwr_logger.propagate = False

        ray_ready.wait()  # Flower's backend initialises Ray only when it is not running yet
        with tempfile.TemporaryDirectory(prefix="medfed-app-") as app_dir:
            _write_app_dir(Path(app_dir), run_config)
            # Flower creates the Run; ClientApps read the run config from the app directory's defaults, the
            # ServerApp from this context (its run id is informational: the Grid carries the real one).
            context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
            _run_simulation(
                num_supernodes=cfg.federation.hospitals,
                exit_event=_exit_event(),
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend_config,
                server_app_context=context,
                app_dir=app_dir,
                is_app=True,  # nodes read their run config from app_dir only when it is an app directory
                verbose_logging=verbose,
            )


@contextmanager
def _ray_started_early(init_args: Mapping[str, Any]) -> Iterator[threading.Event]:
    """Start Ray in the background with the arguments Flower's Ray backend uses; Flower then reuses it.

    Like Flower, Ray's workers get this process's ``sys.path`` as PYTHONPATH, but through the inherited
    environment rather than a ``runtime_env``: that lets the actor use a worker Ray pre-started, instead of
    a new one (measured: ~1.7 s less start-up). The starting thread lives until the block ends, because Ray ties
    its GCS and raylet to the life of the thread that started them. If this start fails, Flower's backend
    starts Ray itself and reports any error.
    """
    ready, done = threading.Event(), threading.Event()

    def start() -> None:
        try:
            import ray

            pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
            os.environ["PYTHONPATH"] = pythonpath
            if not ray.is_initialized():
                ray.init(**init_args)  # workers inherit PYTHONPATH from this environment
        except Exception:  # noqa: BLE001 - Flower's own start raises the real error
            logger.debug("starting Ray early failed; Flower's backend will start it", exc_info=True)
        finally:
            ready.set()
        done.wait()

    thread = threading.Thread(target=start, name="medfed-ray-start", daemon=True)
    thread.start()
    try:
        yield ready
    finally:
        done.set()
        thread.join()


def _exit_event() -> Any:
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE
