"""The run directory: the contract every run (federated or baseline) writes and reviewers rely on.

```
RUN_DIR/config.yaml        the resolved config
RUN_DIR/overrides.json     the command-line overrides it was composed from (used by --resume)
RUN_DIR/metrics.jsonl      one JSON line per round
RUN_DIR/summary.json       best round (by federated validation AUC), final round, per-site entries, timings
RUN_DIR/model.pt           the final model weights
RUN_DIR/best_model.pt      the weights of the best-validation round
RUN_DIR/checkpoints/last.pt  the latest round's weights, tracker state and server optimizer state (for --resume)
RUN_DIR/.lock              held (flock) by the one process writing the run
```
Every file is written atomically (temp file + rename), so a crash never leaves half a file behind, and one process
at a time writes a run (:meth:`RunDirectory.exclusive`): a resumed run waits until nothing of the interrupted one
is left writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.atomic import atomic_write
from medfed.common import keys
from medfed.common.errors import ConfigError, MedfedError, PolicyRefusal, PrivacyBudgetExceeded, RunFailed
from medfed.common.models.weights import load_checkpoint, load_checkpoint_section, save_checkpoint

__all__ = ["STRATEGY_SECTION", "RunDirectory", "json_safe"]

logger = logging.getLogger(__name__)

STRATEGY_SECTION = "strategy_state"  # the checkpoint section holding the server optimizer's moments


def json_safe(value: Any) -> Any:
    """Recursively replace nan/inf by None and numpy scalars by Python numbers (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, binary=False) as handle:
        handle.write(text)


class RunDirectory:
    """Reads and writes one run's files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def overrides_path(self) -> Path:
        return self.path / "overrides.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def best_model_path(self) -> Path:
        return self.path / "best_model.pt"

    @property
    def last_checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def environment_path(self) -> Path:
        return self.path / "environment.json"

    def write_environment(self, versions: Mapping[str, str]) -> None:
        """The software a run (or a resumed session of it) ran with."""
        _atomic_write_text(self.environment_path, json.dumps(dict(versions), indent=1, sort_keys=True) + "\n")

    @property
    def evaluation_dir(self) -> Path:
        """The final evaluation's files: the test set's labels and probabilities per model variant."""
        return self.path / "evaluation"

    def snapshot_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:04d}.pt"

    def save_snapshot(self, server_round: int, arrays: Mapping[str, np.ndarray], keep: int) -> None:
        """Keep this round's global model for a snapshot ensemble; only the ``keep`` latest rounds stay on disk."""
        self.save_weights(self.snapshot_path(server_round), arrays, {"round": server_round})
        for old in self.snapshot_paths()[:-keep]:
            old.unlink(missing_ok=True)

    def snapshot_paths(self, up_to: int | None = None) -> list[Path]:
        """The kept per-round models, oldest first (those after round ``up_to`` left out: a resumed run's)."""
        paths = sorted((self.path / "checkpoints").glob("round-[0-9][0-9][0-9][0-9].pt"))
        if up_to is not None:
            paths = [p for p in paths if int(p.stem.split("-")[1]) <= up_to]
        return paths

    # --- config --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold the run's lock while writing it; wait up to ``timeout`` seconds for an earlier writer to end.

        The lock is an OS file lock: it is released when its holder exits, however it exits.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+b") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ConfigError(
                            f"Another process is still writing the run in {self.path} (it holds {self.path / '.lock'}"
                            f" after {timeout:.0f} s); stop it, or choose another --run-dir."
                        ) from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_config(self, config_yaml: str, overrides: Sequence[str]) -> None:
        """Keep the resolved config and the overrides it came from."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config_path, config_yaml)
        _atomic_write_text(self.overrides_path, json.dumps(list(overrides), indent=1) + "\n")

    def read_overrides(self) -> list[str]:
        """The overrides a run was started with (``--resume`` composes the same config from them)."""
        if not self.overrides_path.is_file():
            raise ConfigError(
                f"{self.path.name}/overrides.json is missing: this is not a medfed run directory, or it was "
                "created by another tool. Start a new run with `medfed simulate --run-dir DIR`."
            )
        overrides = json.loads(self.overrides_path.read_text(encoding="utf-8"))
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{self.path.name}/overrides.json must hold a JSON list of key=value strings.")
        return overrides

    # --- metrics -------------------------------------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one round's record as a strict-JSON line and flush it to disk."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete line of metrics.jsonl (a torn last line from a crash is ignored)."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("ignoring a torn line in %s", self.metrics_path.name)
        return records

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written after the last checkpoint, before a crash)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        _atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # --- summary and weights -------------------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _atomic_write_text(self.summary_path, json.dumps(json_safe(summary), indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def unanswered(self, summary: Mapping[str, Any]) -> RunFailed | None:
        """The failure of a finished run (``summary``: its summary.json) in which no hospital ever sent a usable
        answer, unless every hospital refused on purpose (its privacy cap, its policy): then it ended cleanly."""
        if summary.get("sites"):
            return None
        reasons = [str(d.get("reason", "")) for line in self.read_metrics() for d in line.get("dropped", [])]
        failures = [r for r in reasons if keys.site_refusal(r) is None]
        if not failures:
            return None
        refused = len(reasons) - len(failures)
        return RunFailed(
            f"No hospital sent a usable answer in this run: {len(failures)} request(s) failed and {refused} were "
            f"refused. The first failure: {failures[0][:500]} (each hospital's own log has the details). The "
            "summary and metrics.jsonl of the run were written nonetheless."
        )

    def trained_nowhere(self) -> MedfedError | None:
        """Why no hospital trained in this finished run, when none did: every request to train was refused (its
        privacy cap or plan, its policy) or failed. None when some hospital trained in some round (or when an
        older run's metrics do not say)."""
        lines = self.read_metrics()
        if not lines or any(site.get("trained", True) for line in lines for site in (line.get("sites") or {}).values()):
            return None
        reasons = [str(d.get("reason", "")) for line in lines for d in line.get("dropped", [])
                   if d.get("phase", "train") == "train"]
        kinds = [keys.site_refusal(r) for r in reasons]
        labels = ((keys.SiteRefusal.PRIVACY_BUDGET, "refused at a privacy cap or out of privacy reach"),
                  (keys.SiteRefusal.SIT_OUT, "sat out by a privacy plan"),
                  (keys.SiteRefusal.POLICY, "refused by site policy"), (None, "failed"))
        counts = ", ".join(f"{kinds.count(kind)} {label}" for kind, label in labels if kind in kinds)
        telling = [r for r, k in zip(reasons, kinds, strict=True) if k is not keys.SiteRefusal.SIT_OUT] or reasons
        first = telling[0][:500] if telling else "no hospital was asked"
        error: type[MedfedError] = RunFailed
        if kinds and all(k in (keys.SiteRefusal.PRIVACY_BUDGET, keys.SiteRefusal.SIT_OUT) for k in kinds):
            error = PrivacyBudgetExceeded
        elif kinds and all(k is not None for k in kinds):
            error = PolicyRefusal
        return error(
            f"No hospital trained in this run ({len(lines)} round(s); of the requests to train, {counts or 'none'}), "
            f"so its model is the initial one and no result table is shown. The first reason: {first} The run's "
            "metrics.jsonl and summary.json say the same round by round."
        )

    def save_weights(
        self,
        path: Path,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write weights with their metadata and, in the same file, the strategy's state (server optimizer moments)."""
        save_checkpoint(path, arrays, json_safe(meta), {STRATEGY_SECTION: strategy_state} if strategy_state else None)

    def load_last_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The latest checkpoint's weights and metadata, or None when the run has none yet."""
        if not self.last_checkpoint_path.is_file():
            return None
        arrays, meta = load_checkpoint(self.last_checkpoint_path)
        return dict(arrays), meta

    def load_strategy_state(self) -> dict[str, np.ndarray]:
        """The strategy state saved with the latest checkpoint (empty when there is none)."""
        if not self.last_checkpoint_path.is_file():
            return {}
        return load_checkpoint_section(self.last_checkpoint_path, STRATEGY_SECTION)
