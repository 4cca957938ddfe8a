"""Shared test fixtures: Flower environment, the shared MedMNIST files, Flower message builders."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Set before any test imports flwr: no telemetry, no update checks.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def medmnist_dir() -> Path:
    """Where the shared MedMNIST npz files live (MEDFED_DATA_DIR overrides)."""
    env = os.environ.get("MEDFED_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data" / "medmnist")


@pytest.fixture(autouse=True)
def _flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets a temporary FLWR_HOME and medfed state dir, so nothing touches the user's state."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("MEDFED_STATE_DIR", str(tmp_path_factory.mktemp("medfed-state")))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small tensors run fastest (and steadiest on a shared 2-core machine) on one torch thread; the count is
    restored afterwards. Modules use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_simulation_runtime(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Fail the test if `medfed simulate` gets as far as starting (or joining) Ray, then Flower: its checks must
    refuse first. The list records any attempt."""
    from medfed.simulation import launcher

    started: list[bool] = []

    def refuse(*args: object, **kwargs: object) -> None:
        started.append(True)
        raise AssertionError("Ray and Flower must not start")

    monkeypatch.setattr(launcher, "_ray_started_early", refuse)
    return started


@pytest.fixture
def task_identity() -> Iterator[None]:
    """The running task's identity, which Flower stamps on every Message it builds (set by its app processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 7
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None  # type: ignore[assignment]


def shared_medmnist(name: str) -> Path | None:
    """The shared MedMNIST file ``NAME.npz`` a test reads, or None when it is absent (the test then falls back or
    skips). With ``MEDFED_REQUIRE_DATA=1`` (CI) an absent file fails the test instead: nothing passes silently on
    less than the real data."""
    path = medmnist_dir() / f"{name}.npz"
    if path.is_file():
        return path
    if os.environ.get("MEDFED_REQUIRE_DATA") == "1":
        pytest.fail(f"{path} is missing and MEDFED_REQUIRE_DATA=1: put the shared MedMNIST files there (or set "
                    "MEDFED_DATA_DIR)")
    return None


def require_medmnist(name: str) -> Path:
    """The folder holding the shared ``NAME.npz`` (the one file the test reads); the test skips with the reason
    when it is absent, and fails under ``MEDFED_REQUIRE_DATA=1``."""
    path = shared_medmnist(name)
    if path is None:
        pytest.skip(f"shared MedMNIST {name}.npz not found in {medmnist_dir()} (set MEDFED_DATA_DIR)")
    return path.parent


def instruction(content, message_type: str, *, dst_node_id: int = 7, message_id: str = "m-1", run_id: int = 1):
    """A Message as the ServerApp would send it to a node (built with explicit metadata, no SuperLink)."""
    from flwr.app import DEFAULT_TTL, Message, Metadata

    metadata = Metadata(
        run_id=run_id,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def reply(content, *, src_node_id: int, message_type: str = "train", error=None):
    """A Message as a node would reply (for strategy tests with mocked replies)."""
    from flwr.app import DEFAULT_TTL, Message, Metadata

    metadata = Metadata(
        run_id=1,
        message_id=f"r-{src_node_id}",
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id="m-1",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    if error is not None:
        return Message(error, metadata=metadata)
    return Message(content=content, metadata=metadata)


DICOM_PATIENT = "Doe^Jane"  # written into test DICOM headers; must never appear in anything that leaves a site


def write_dicom(path: Path, pixels, *, z: float | None = None, series: str | None = None) -> Path:
    """A test DICOM file holding ``pixels``, with a patient's name and id in its header."""
    from medfed.common.data.dicom import write_dicom as write

    return write(path, pixels, patient_name=DICOM_PATIENT, patient_id="PID-12345", modality="US", z=z, series=series)
