"""`medfed tune`: a hyperparameter search over a federation's recipe.

Optuna (a maintained library: TPE sampler, median pruner) proposes the recipe of each trial; every trial is a
normal run in its own run directory (``<out>/trial-NNN``), followed through its ``metrics.jsonl``: a `medfed
simulate` process of its own (:func:`simulation_launcher`), or, with `medfed tune --dir`, a real run on a
coordinator's hospitals (``medfed.cli.tune.deployment_launcher``, whose hospitals' own ledgers are charged). After
each round the trial reports the best federated validation AUC so far (the weighted mean of the hospitals'
validation AUCs, model selection's number) and the pruner stops a trial that trails the median of the earlier
trials at the same round (the run is stopped: a simulation's process by its PID, a deployment's run on the
coordinator). A trial's value is the validation AUC of its best-validation round.

The test split is never read by the search: every trial runs with ``evaluate.test_split=false``, under which the
data loader refuses the test split (:class:`medfed.common.data.WithheldTestSplit`) and no test metric is computed.
The best recipe is written as a config file (``<out>/best.yaml``, a list of overrides, without that override) that
``medfed simulate --config-file`` and ``medfed train --config-file`` accept; its run reports the test metrics once.

Under ``privacy=dp`` every trial is a run of the simulated hospitals on their data and is charged to their privacy
ledgers like any run (tuning spends privacy too): the trials share one state folder (``<out>/state`` unless
``--state-dir``), so the ledger holds what the whole search spent, and ``tune.json`` reports it per hospital.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from medfed.common.config import Config, DPConfig, compose_config, override_key, write_config_file
from medfed.common.errors import ConfigError, MedfedError
from medfed.common.processes import stop_tree
from medfed.server.runs import RunDirectory

__all__ = ["Launcher", "Param", "SimulatedTrial", "TrialResult", "TrialRun", "TuneResult", "default_space",
           "read_space", "reported_spend", "run_tune", "simulation_launcher", "space_from"]

logger = logging.getLogger(__name__)

WITHHOLD_TEST = "evaluate.test_split=false"


@dataclass(frozen=True)
class Param:
    """One searched key: a float or integer range (``log``: sampled on a log scale) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The trial's value for this key (Optuna's ``suggest_*``)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key}: one of {list(self.choices)}"
        kind = "integer" if self.integer else "float"
        return f"{self.key}: {kind} in [{self.low:g}, {self.high:g}]{' (log scale)' if self.log else ''}"


def _param(key: str, spec: Any, where: str) -> Param:
    """A :class:`Param` from its YAML form: ``{low: 1e-4, high: 1e-2, log: true}``, ``{choices: [16, 32]}``, or a
    plain list of choices."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: {key}: {spec!r} is not a search range; give {{low: A, high: B}} (add log: true "
                          "for a log scale) or {choices: [A, B, ...]}.")
    unknown = sorted(set(spec) - {"low", "high", "log", "choices"})
    if unknown:
        raise ConfigError(f"{where}: {key} has the unknown fields {unknown}; allowed: low, high, log, choices.")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}: {key}: choices must be a non-empty list of plain values, got {choices!r}.")
        if set(spec) - {"choices"}:
            raise ConfigError(f"{where}: {key}: give either choices or low/high, not both.")
        return Param(key, choices=tuple(choices))
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or \
            not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high or \
            not isinstance(log, bool) or (log and low <= 0):
        raise ConfigError(f"{where}: {key}: low={low!r}, high={high!r}, log={log!r} is not a range; low < high are "
                          "numbers (both > 0 with log: true).")
    return Param(key, low=low, high=high, log=log, integer=isinstance(low, int) and isinstance(high, int))


def read_space(path: Path) -> list[Param]:
    """A search space file: a YAML mapping of config keys to ranges or choices, e.g.::

        train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        train.local_epochs: {low: 1, high: 5}
        train.batch_size: [16, 32, 64]
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--space {path}: no such file; give a YAML file of key: range lines, or `default`.") \
            from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--space {path} could not be read as YAML ({type(exc).__name__}).") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"--space {path} must be a mapping of config keys to ranges (e.g. train.lr: {{low: 1.0e-4, "
                          "high: 1.0e-2, log: true}}), and have at least one key.")
    return [_param(str(key), spec, f"--space {path}") for key, spec in data.items()]


def default_space(cfg: Config) -> list[Param]:
    """The default search: the local recipe (learning rate, local work, batch, optimizer, schedule, weight decay,
    augmentation on or off), the configured strategy's own options, and the clipping norm under ``privacy=dp``.
    Local work is searched in steps per round (the default recipe's unit), or in epochs under DP-SGD (whose plan
    counts epochs) and where the recipe counts epochs."""
    dp_sgd = isinstance(cfg.privacy, DPConfig)  # (privacy=dp and distributed_dp)
    work = (Param("train.local_epochs", 1, 5, integer=True) if dp_sgd or cfg.train.local_epochs
            else Param("train.local_steps", 10, 200, log=True, integer=True))
    space = [
        Param("train.lr", 1e-4, 3e-2, log=True),
        work,
        Param("train.batch_size", choices=(16, 32, 64)),
        Param("train.optimizer", choices=("adamw", "sgd")),
        Param("train.lr_schedule", choices=("constant", "cosine")),
        Param("train.weight_decay", 1e-6, 1e-2, log=True),
        # random flips, rotation with zoom, intensity at every step: small sites gain most (BreastMNIST validation
        # AUC 0.846 against 0.778 with the default recipe), but not every task does; the search decides
        Param("train.augment.enabled", choices=(False, True)),
    ]
    strategy = cfg.strategy.name
    if strategy == "fedprox":
        space.append(Param("strategy.mu", 1e-3, 1.0, log=True))
    elif strategy in ("fedadam", "fedyogi", "fedadagrad"):
        space += [Param("strategy.eta", 1e-3, 1.0, log=True), Param("strategy.tau", 1e-4, 1e-1, log=True)]
    elif strategy == "fedavgm":
        space += [Param("strategy.server_learning_rate", 0.1, 2.0, log=True),
                  Param("strategy.server_momentum", 0.0, 0.95)]
    if cfg.privacy.name == "dp":
        space.append(Param("privacy.max_grad_norm", 0.1, 10.0, log=True))
    return space


def space_from(spec: str | Path, cfg: Config, overrides: Sequence[str]) -> tuple[list[Param], list[str]]:
    """The search space (``default`` or a file) less the keys the command line pins; and the pinned keys."""
    space = default_space(cfg) if str(spec) == "default" else read_space(Path(spec))
    pinned = {override_key(o) for o in overrides}
    kept = [p for p in space if p.key not in pinned]
    if not kept:
        raise ConfigError("Every key of the search space is pinned by an override; nothing is left to search. Drop "
                          f"an override of {sorted(p.key for p in space)} or search other keys.")
    return kept, sorted(pinned & {p.key for p in space})


def _value(value: Any) -> str:
    """A sampled value as Hydra reads it back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass
class TrialResult:
    """One trial: its recipe, what it reached on validation, how it ended."""

    number: int
    # complete | pruned | failed | interrupted (the search was stopped meanwhile: its run stopped too) | repeat (the
    # sampler proposed a recipe already run: its value reused)
    state: str
    params: dict[str, Any]
    # its best-validation round's weighted validation AUC (the trial's value); a pruned or interrupted trial's best
    # so far
    val_auc: float | None
    best_round: int | None
    rounds: int  # rounds it recorded
    wall_s: float
    run_dir: str
    error: str | None = None
    started_s: float = 0.0  # when it started, seconds after the search did (trials run at once overlap)


@dataclass
class TuneResult:
    """The search: every trial, the best one, and the recipe file written for it."""

    trials: list[TrialResult]
    best: TrialResult | None
    best_config: Path | None
    wall_s: float
    base_overrides: list[str]
    space: list[str]
    # under DP: each simulated hospital's ledger (by its data's fingerprint): the epsilon the whole search spent
    privacy_spent: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: the trials before it, and its runs stopped

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["best_config"] = str(self.best_config) if self.best_config is not None else None
        return out


def _auc(record: Mapping[str, Any]) -> float | None:
    value = (record.get("val") or {}).get("auc")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class TrialRun(Protocol):
    """One trial's run, started by a :data:`Launcher`: followed through its run directory, stopped when pruned."""

    def ended(self) -> bool:
        """Whether the run has ended (finished, failed or stopped)."""

    def failure(self) -> str | None:
        """Once ended: why the run has no summary (None when it finished)."""

    def stop(self) -> None:
        """Stop the run now (a pruned or timed-out trial)."""


# (run directory, overrides, log file) -> the started run
Launcher = Callable[[Path, list[str], Path], TrialRun]


class SimulatedTrial:
    """A trial as a `medfed simulate` process of its own (its output in the trial's log file)."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "COLUMNS": "160"})

    def ended(self) -> bool:
        if self.process.poll() is None:
            return False
        self._out.close()
        return True

    def failure(self) -> str | None:
        if self.process.returncode == 0:
            return None
        tail = self.log.read_text(errors="replace")[-600:]
        return f"medfed simulate exited with {self.process.returncode}: {tail.strip()}"

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_tree(self.process.pid, timeout=10)  # its process tree, by PID
            self.process.wait(timeout=30)
        self._out.close()


def simulation_launcher(*, cache_dir: Path | None, state_dir: Path) -> Launcher:
    """Trials as simulations on this machine, charged to the simulated hospitals' ledgers in ``state_dir``."""

    def launch(run_dir: Path, overrides: list[str], log: Path) -> TrialRun:
        command = [sys.executable, "-m", "medfed.cli.main", "simulate", "--run-dir", str(run_dir),
                   "--state-dir", str(state_dir)]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        return SimulatedTrial([*command, *overrides], log)

    return launch


class _Trials:
    """Runs one trial: started by the launcher, followed round by round through its ``metrics.jsonl``, pruned
    through Optuna."""

    def __init__(self, out: Path, base: list[str], space: list[Param], *, launcher: Launcher,
                 trial_timeout_s: float, progress: Callable[[str], None], rounds: int) -> None:
        self.started = time.monotonic()
        self.out, self.base, self.space = out, base, space
        self.launcher = launcher
        self.trial_timeout_s = trial_timeout_s
        self.progress = progress
        self.rounds = rounds
        self.results: dict[int, TrialResult] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # the search was interrupted: every trial stops its run

    def __call__(self, trial: Any) -> float:
        import optuna

        params = {p.key: p.suggest(trial) for p in self.space}
        with self._lock:
            earlier = next((r for r in self.results.values() if r.params == params and r.state == "complete"), None)
        if earlier is not None:  # the sampler proposed a recipe already run: the run is deterministic, reuse it
            assert earlier.val_auc is not None
            repeat = TrialResult(trial.number, "repeat", params, earlier.val_auc, earlier.best_round, earlier.rounds,
                                 0.0, earlier.run_dir, error=f"the recipe of trial {earlier.number}: not run again")
            with self._lock:
                self.results[trial.number] = repeat
            self.progress(f"trial {trial.number}: the recipe of trial {earlier.number}, validation AUC "
                          f"{earlier.val_auc:.4f} (not run again)")
            return earlier.val_auc
        overrides = [*self.base, *(f"{k}={_value(v)}" for k, v in params.items()), WITHHOLD_TEST]
        run_dir = (self.out / f"trial-{trial.number:03d}").resolve()
        started = time.monotonic()
        result = TrialResult(trial.number, "failed", params, None, None, 0, 0.0, str(run_dir),
                             started_s=started - self.started)
        run: TrialRun | None = None
        seen, best = 0, -math.inf
        try:
            run = self.launcher(run_dir, overrides, self.out / f"trial-{trial.number:03d}.log")
            while True:
                done = run.ended()
                lines = RunDirectory(run_dir).read_metrics()
                for record in lines[seen:]:
                    auc = _auc(record)
                    if auc is not None:
                        best = max(best, auc)
                    if math.isfinite(best):
                        trial.report(best, int(record["round"]))
                    seen += 1
                    if math.isfinite(best) and int(record["round"]) < self.rounds and trial.should_prune():
                        result.state, result.val_auc = "pruned", best
                        raise optuna.TrialPruned(f"round {record['round']}: best validation AUC {best:.4f} trails "
                                                 "the median of the earlier trials")
                if done:
                    break
                if self.stopping.is_set():
                    raise KeyboardInterrupt
                if time.monotonic() - started > self.trial_timeout_s:
                    result.error = f"ran past --trial-timeout {self.trial_timeout_s:g} s"
                    raise RuntimeError(result.error)
                time.sleep(0.5)
            result.rounds = seen
            failure = run.failure()
            if failure is not None or not RunDirectory(run_dir).summary_path.is_file():
                result.error = failure or "the run ended without a summary.json"
                raise RuntimeError(result.error)
            summary = RunDirectory(run_dir).read_summary()
            best_entry = summary.get("best") or {}
            value = _auc(best_entry)
            result.best_round = best_entry.get("round")
            if value is None:
                result.error = "no round had a defined validation AUC"
                raise RuntimeError(result.error)
            result.state, result.val_auc = "complete", value
            return value
        except MedfedError as exc:  # the launch was refused (e.g. the coordinator did not answer): a failed trial
            result.error = str(exc)
            raise RuntimeError(result.error) from None
        except KeyboardInterrupt:  # the search was interrupted: this trial's run is stopped (finally)
            self.stopping.set()
            result.state, result.error = "interrupted", "the search was interrupted"
            result.val_auc = best if math.isfinite(best) else None
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(result.error) from None  # (a worker of --parallel: recorded, the others stop)
            raise
        finally:
            if run is not None and not run.ended():
                run.stop()  # a pruned or timed-out trial
            # the rounds its run directory holds once the run has stopped (a round written between the last read
            # and an interruption counts too)
            result.rounds = max(result.rounds, seen, len(RunDirectory(run_dir).read_metrics()))
            result.wall_s = time.monotonic() - started
            with self._lock:
                self.results[trial.number] = result
            shown = f"{result.val_auc:.4f}" if result.val_auc is not None else "-"
            self.progress(f"trial {trial.number}: {result.state}, validation AUC {shown}, {result.rounds} rounds, "
                          f"{result.wall_s:.0f} s  " + " ".join(f"{k}={_value(v)}" for k, v in params.items()))


def _ledger_spend(state_dir: Path, delta: float) -> dict[str, float]:
    """What each privacy ledger under ``state_dir`` (one per simulated hospital's data, by fingerprint) says was
    spent by every run of the search, at ``delta``."""
    from medfed.client.ledger import site_ledgers
    from medfed.client.privacy import epsilon_spent

    return {ledger.fingerprint: float(epsilon_spent(ledger.entries(), delta))
            for ledger in site_ledgers(state_dir) if ledger.entries()}


@contextlib.contextmanager
def _interruptible(stopping: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM (a closed terminal, a service stop) set ``stopping``, which every trial checks to stop its
    run, and raise KeyboardInterrupt in the main thread. Without this a SIGTERM would end the command and leave the
    running trial's run going (on a coordinator, until it finished)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def reported_spend(run_dirs: Sequence[Path]) -> dict[str, float]:
    """Each hospital's cumulative epsilon as it reported it in the runs' ``metrics.jsonl`` (the largest figure: its
    ledger's total after its last charge, runs before the search included), by site id. In a deployment this is
    what the coordinator can know of the hospitals' ledgers."""
    spent: dict[str, float] = {}
    for run_dir in run_dirs:
        run = RunDirectory(run_dir)
        # the rounds' lines, and the summary (its figures include the releases after the last round)
        records = [*run.read_metrics(), *([run.read_summary()] if run.summary_path.is_file() else [])]
        for record in records:
            for site, entry in (record.get("sites") or {}).items():
                epsilon = entry.get("epsilon")
                if isinstance(epsilon, (int, float)) and math.isfinite(epsilon):
                    spent[site] = max(spent.get(site, 0.0), float(epsilon))
    return spent


def run_tune(
    overrides: Sequence[str],
    *,
    trials: int,
    space: str | Path,
    out: Path,
    parallel: int = 1,
    seed: int = 0,
    cache_dir: Path | None = None,
    state_dir: Path | None = None,
    trial_timeout_s: float = 24 * 3600.0,
    progress: Callable[[str], None] = lambda line: None,
    launcher: Launcher | None = None,
) -> TuneResult:
    """Search ``trials`` recipes of the federation ``overrides`` describes; write ``<out>/tune.json`` and
    ``<out>/best.yaml``; return what was found. ``launcher`` starts each trial's run (default: a simulation on this
    machine, charged to the ledgers in ``state_dir``; `medfed tune --dir` passes one that launches real runs on a
    coordinator's hospitals, whose own ledgers are charged)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("medfed tune needs Optuna: pip install 'medfed[tune]' (or pip install 'optuna>=4,<6').") \
            from None
    if trials < 1 or parallel < 1:
        raise ConfigError(f"--trials {trials} and --parallel {parallel} must both be >= 1.")
    base = [o for o in overrides if override_key(o) != "evaluate.test_split"]
    if len(base) != len(overrides):
        raise ConfigError("medfed tune withholds the test split from every trial itself; drop the "
                          "evaluate.test_split override.")
    cfg = compose_config(base)  # a bad base recipe is refused before any trial starts
    params, pinned = space_from(space, cfg, base)
    if pinned:
        progress(f"not searched (fixed by your overrides): {', '.join(pinned)}")
    # every value at both ends of its range must compose (a bad key or value is refused now, not in trial 7)
    for p in params:
        for value in (p.choices or (p.low, p.high)):
            compose_config([*base, f"{p.key}={_value(int(value) if p.integer else value)}", WITHHOLD_TEST])
    if (out / "tune.json").exists() or any(out.glob("trial-*")):
        raise ConfigError(f"--out {out} already holds a search (tune.json or trial-* folders); choose another --out "
                          "(each trial is a run directory of its own).")
    out.mkdir(parents=True, exist_ok=True)
    progress(f"tuning {trials} trials ({parallel} at a time) -> {out}")  # (once every check has passed)
    state = state_dir if state_dir is not None else out / "state"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rounds = cfg.train.rounds
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3))),
        # no pruning in a run's first third (its first rounds say little), nor at its last round (it is done)
        pruner=optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 5)),
                                           n_warmup_steps=max(2, rounds // 3)),
    )
    simulated = launcher is None
    runner = _Trials(out, base, params, launcher=launcher or simulation_launcher(cache_dir=cache_dir, state_dir=state),
                     trial_timeout_s=trial_timeout_s, progress=progress, rounds=rounds)
    started = time.monotonic()
    interrupted = False
    try:
        with _interruptible(runner.stopping):
            # a failed trial is recorded and the search goes on (one bad recipe never ends a search)
            study.optimize(runner, n_trials=trials, n_jobs=parallel, catch=(RuntimeError,))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running trials' runs were stopped; keep what was found
        interrupted = True
        progress(f"interrupted: the running trials' runs were stopped; {out}/tune.json and best.yaml hold the "
                 "trials that completed")
    results = [runner.results[n] for n in sorted(runner.results)]
    complete = [r for r in results if r.state == "complete" and r.val_auc is not None]
    best = max(complete, key=lambda r: (r.val_auc, -r.number)) if complete else None
    best_config = None
    if best is not None:
        best_config = out / "best.yaml"
        recipe = [*base, *(f"{k}={_value(v)}" for k, v in best.params.items())]
        write_config_file(best_config, recipe, (
            f"medfed tune: the best of {len(results)} trials by federated validation AUC (the test split was never "
            f"read)\ntrial {best.number}: validation AUC {best.val_auc:.4f} at round {best.best_round} "
            f"({best.run_dir})\nrun it: medfed simulate --config-file {best_config}  (or medfed train --dir COORD "
            "--config-file ...)"))
    if simulated:
        spent = _ledger_spend(state, float(getattr(cfg.privacy, "delta", 1e-5))) if state.is_dir() else {}
    else:  # a deployment's ledgers are the hospitals' own: what they reported
        spent = reported_spend([Path(r.run_dir) for r in results if r.state != "repeat"])
    result = TuneResult(results, best, best_config, time.monotonic() - started, base, [p.describe() for p in params],
                        spent, interrupted=interrupted)
    (out / "tune.json").write_text(json.dumps(result.as_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    return result
