"""Launch a federation in Flower's simulation runtime (one virtual SuperNode per hospital).

The run config carries the Hydra overrides, so the ServerApp and every ClientApp compose the same typed config.
Flower's public ``run_simulation`` cannot carry a run config, so this launches the runtime the way Flower's own
``flwr-simulation`` process does: a ``Run`` whose app directory holds the run config as the app's defaults.

The hospitals run on a private Ray started here, or, with ``federation.ray_address``, on an existing Ray cluster
that this process joins (:mod:`~medfed.simulation.ray_cluster`); either way the ServerApp runs in this process, which
writes the run directory.
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
from medfed.common.errors import ConfigError
from medfed.simulation.polling import sparse_polling
from medfed.simulation.ray_cluster import require_capacity, require_reachable, resolve_address, unreachable

__all__ = ["check_hardware", "hospital_resources", "run_simulation"]

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
    """Run the ServerApp and ``federation.hospitals`` ClientApps in Flower's simulation runtime (blocking), after
    :func:`check_hardware`: on a private Ray on this machine, or on the Ray cluster at ``federation.ray_address``
    (joined, never shut down: this process only disconnects).

    Raises:
        ServiceUnavailable: the cluster cannot be found or joined.
        ConfigError: hardware this machine lacks, or a cluster none of whose nodes can host a hospital.
    """
    gpus = check_hardware(cfg, cache_dir)
    flower_environment()
    given = cfg.federation.ray_address
    cluster = resolve_address(given) if given else None
    if cluster is not None:
        require_reachable(cluster, given)
        init_args: dict[str, Any] = {"address": cluster}  # the cluster's nodes bring their own CPUs and GPUs
    else:  # "local": a new Ray even when `ray start` or $RAY_ADDRESS names a cluster
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1, "num_gpus": gpus, "include_dashboard": False}
    resources = hospital_resources(cfg)
    backend_config = {"client_resources": resources, "init_args": init_args}
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
    with _ray_started_early(init_args) as ray_start:
        from flwr.app import Context, RecordDict
        from flwr.simulation.run_simulation import _run_simulation

        from medfed.client.app import app as client_app
        from medfed.server.app import app as server_app

        flwr_logger = logging.getLogger("flwr")  # Flower sets its own level and handler on import
        flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        flwr_logger.propagate = False

        error = ray_start.wait()  # Flower's backend initialises Ray only when it is not running yet
        if cluster is not None:
            _joined(cluster, given, error, resources)
        with tempfile.TemporaryDirectory(prefix="medfed-app-") as app_dir:
            _write_app_dir(Path(app_dir), run_config)
            # Flower creates the Run; ClientApps read the run config from the app directory's defaults, the
            # ServerApp from this context (its run id is informational: the Grid carries the real one).
            context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
            with sparse_polling():  # the engine asks only nodes with a message waiting (1,000 hospitals, 10 asked)
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


def hospital_resources(cfg: Config) -> dict[str, float]:
    """What Ray reserves for each simulated hospital (Flower's ``client_resources``): ``federation.cpus_per_hospital``
    CPUs (0: this machine's cores / ``federation.parallel``, or 1 on a cluster) and
    ``federation.gpus_per_hospital`` GPUs."""
    cpus = float(cfg.federation.cpus_per_hospital)
    if cpus <= 0:
        parallel = max(1, min(cfg.federation.parallel, cfg.federation.hospitals))
        cpus = 1.0 if cfg.federation.ray_address else float(max(1, (os.cpu_count() or 1) // parallel))
    return {"num_cpus": cpus, "num_gpus": float(cfg.federation.gpus_per_hospital)}


def _joined(address: str, given: str, error: BaseException | None, resources: dict[str, float]) -> None:
    """After joining the cluster: a failed join is a :class:`ServiceUnavailable`, a cluster with no room a
    :class:`ConfigError` (this process then disconnects before raising)."""
    if error is not None:
        raise unreachable(address, given, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    try:
        require_capacity(resources, address)
    except BaseException:
        import ray

        ray.shutdown()  # a driver that joined a cluster only disconnects
        raise


def check_hardware(cfg: Config, cache_dir: Path) -> int:
    """Before Flower starts: the device and the GPUs the config asks for exist, the hospitals' device can run
    ``train.amp``, and, when ``train.device_memory_gb`` declares the device's memory, a hospital's training fits it
    (or its share of it, with ``federation.gpus_per_hospital`` < 1). Returns the GPUs Ray is told of (0 without
    ``federation.gpus_per_hospital``: Ray then hides every GPU from the hospitals).

    On a Ray cluster (``federation.ray_address``) the hospitals run on the cluster's nodes, each checking its own
    device and memory at its first message: only the config's consistency is checked here, and 0 is returned.

    Raises:
        ConfigError: a device, GPUs or CPUs this machine does not have, or a model too big for the declared memory.
    """
    import torch

    from medfed.common.config import DPConfig
    from medfed.common.hardware import GIB, amp_dtype, estimate_for_config, require_fits, resolve_device

    share = float(cfg.federation.gpus_per_hospital)
    if cfg.federation.ray_address:
        if share == 0 and str(cfg.train.device).startswith("cuda"):
            raise _hidden_gpus(cfg)
        return 0
    cores = os.cpu_count() or 1
    if cfg.federation.cpus_per_hospital > cores:
        raise ConfigError(
            f"federation.cpus_per_hospital={cfg.federation.cpus_per_hospital:g} exceeds the {cores} cores of this "
            f"machine, so Ray would never start a hospital; set it to at most {cores} (0.5: two per core), or run on a "
            "Ray cluster with bigger nodes (federation.ray_address)."
        )
    device = resolve_device(str(cfg.train.device), key="train.device")
    gpus = 0
    if share > 0:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"federation.gpus_per_hospital={share:g} asks Ray for GPUs, but this machine has no CUDA device "
                f"torch can use (torch {torch.__version__}, CUDA build {torch.version.cuda}); set "
                "federation.gpus_per_hospital=0 to simulate the hospitals on the CPU."
            )
        gpus = torch.cuda.device_count()
        if share > gpus:
            raise ConfigError(f"federation.gpus_per_hospital={share:g} exceeds the {gpus} GPU(s) of this machine, so "
                              f"Ray would never start a hospital; set it to at most {gpus} (0.5: two per GPU).")
    elif str(cfg.train.device).startswith("cuda"):
        raise _hidden_gpus(cfg)
    elif device.type == "cuda":  # train.device=auto: the hospitals' actors see no GPU
        logger.info("the simulated hospitals train on the CPU: set federation.gpus_per_hospital to give them the GPU")
        device = torch.device("cpu")
    amp_dtype(str(cfg.train.amp), device, dp=isinstance(cfg.privacy, DPConfig))  # e.g. fp16 on a CPU, refused now
    if cfg.train.device_memory_gb > 0:
        from medfed.common.data import load_site
        from medfed.common.models.ssl import build_task_model

        site = load_site(cfg, 0, cache_dir=cache_dir)  # the input shape (every hospital's is the same)
        split = site.train if len(site.train) else site.val
        model = build_task_model(cfg, spatial_dims=site.info.spatial_dims, in_channels=site.info.channels,
                                 n_classes=site.info.n_classes)
        estimate = estimate_for_config(cfg, model, tuple(split.images.shape[1:]), device)
        fraction = share if device.type == "cuda" and 0 < share < 1 else 1.0
        available = int(cfg.train.device_memory_gb * GIB * fraction)
        where = f"train.device_memory_gb={cfg.train.device_memory_gb:g} on {device}" + (
            f", a hospital's share federation.gpus_per_hospital={share:g}" if fraction < 1 else "")
        require_fits(estimate, available, where)
    return gpus


def _hidden_gpus(cfg: Config) -> ConfigError:
    return ConfigError(
        f"train.device={cfg.train.device} but federation.gpus_per_hospital=0: Ray hides the GPUs from simulated "
        "hospitals that ask for none. Set federation.gpus_per_hospital (1: a GPU each, 0.5: two per GPU) or "
        "train.device=auto."
    )


class _EarlyStart:
    """Ray's start (or join) in the background: :meth:`wait` blocks until it is done and returns its error, if any."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> BaseException | None:
        self.ready.wait()
        return self.error


@contextmanager
def _ray_started_early(init_args: Mapping[str, Any]) -> Iterator[_EarlyStart]:
    """Start Ray in the background with the arguments Flower's Ray backend uses; Flower then reuses it.

    Like Flower, Ray's workers get this process's ``sys.path`` as PYTHONPATH, but through the inherited
    environment rather than a ``runtime_env``: that lets the actor use a worker Ray pre-started, instead of
    a new one (measured: ~1.7 s less start-up). The starting thread lives until the block ends, because Ray ties
    its GCS and raylet to the life of the thread that started them. If a private start fails, Flower's backend
    starts Ray itself and reports any error; the error of joining a cluster is the caller's to report.
    """
    start_state, done = _EarlyStart(), threading.Event()

    def start() -> None:
        try:
            import ray

            pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
            os.environ["PYTHONPATH"] = pythonpath
            if not ray.is_initialized():
                ray.init(**init_args)  # workers inherit PYTHONPATH from this environment
        except Exception as exc:  # noqa: BLE001 - Flower's own start raises the real error
            start_state.error = exc
            logger.debug("starting Ray early failed", exc_info=True)
        finally:
            start_state.ready.set()
        done.wait()

    thread = threading.Thread(target=start, name="medfed-ray-start", daemon=True)
    thread.start()
    try:
        yield start_state
    finally:
        done.set()
        thread.join()


def _exit_event() -> Any:
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE
