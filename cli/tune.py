"""``medfed tune``: a hyperparameter search over a federation's recipe (medfed.simulation.tuning): simulated on
this machine, or, with ``--dir``, real runs on a coordinator's hospitals."""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medfed.cli.display import fail, folded, make_console
from medfed.common.config import compose_config, overrides_with_config_file
from medfed.common.errors import MedfedError

if TYPE_CHECKING:
    from medfed.simulation.tuning import Launcher, TrialRun

__all__ = ["tune"]

logger = logging.getLogger(__name__)

console = make_console()
err_console = make_console(stderr=True)


def _privacy_notice(overrides: list[str], trials: int, *, deployment: bool) -> str | None:
    """Under DP, what the search will cost the hospitals (None without DP)."""
    cfg = compose_config(overrides)
    if cfg.privacy.name not in ("dp", "distributed_dp", "central_dp"):
        return None
    target = getattr(cfg.privacy, "target_epsilon", math.nan)
    where = ("the coordinator's hospitals' real data, charged to each hospital's own privacy ledger (a hospital whose "
             "cap cannot afford a trial refuses it)" if deployment else
             "the simulated hospitals' data, charged to their privacy ledgers")
    return (f"privacy={cfg.privacy.name}: each of the {trials} trials is a run on {where} like any run: up to epsilon "
            f"{target:g} per trial and hospital, composed over the trials (up to {trials * target:g} for the whole "
            "search at a hospital that takes part in every trial): tuning spends privacy too.")


class DeploymentTrial:
    """A trial as a real run launched on the coordinator's hospitals (`medfed train`), followed through its run
    directory, which the coordinator's ServerApp writes on this machine."""

    STATUS_EVERY_S = 10.0  # Flower's CLI is a process start: the run's status is asked now and then

    def __init__(self, directory: Path, run_dir: Path, overrides: list[str], log: Path) -> None:
        from medfed.cli.coordination import launch_run, open_coordinator
        from medfed.server.runs import RunDirectory

        self.directory = directory
        self.coordinator = open_coordinator(directory)
        self.run_id, self.run_dir, _ = launch_run(directory, overrides, run_dir)
        self.target = RunDirectory(self.run_dir)
        self.log = log
        self.status = ""
        self._next_status = time.monotonic() + self.STATUS_EVERY_S
        log.write_text(f"run {self.run_id} launched on the coordinator {directory} -> {self.run_dir}\nits ServerApp "
                       f"log: medfed runs logs {self.run_id} --dir {directory}\n", encoding="utf-8")

    def ended(self) -> bool:
        if self.target.summary_path.exists():
            return True
        if time.monotonic() < self._next_status:
            return False
        self._next_status = time.monotonic() + self.STATUS_EVERY_S
        try:
            status = self.coordinator.status(self.run_id)
        except MedfedError as exc:  # the coordinator restarting: ask again later (--trial-timeout bounds the wait)
            logger.warning("run %s: the coordinator did not answer (%s); asking again in %.0f s", self.run_id,
                           str(exc).splitlines()[0][:200], self.STATUS_EVERY_S)
            return False
        self.status = str(status[0].get("status", "")) if status else ""
        if not self.status.startswith("finished"):
            return False
        # a coordinator restart resumes a run that was cut off as a new run writing the same directory: follow it
        resumed = self.coordinator.runs().get(str(self.run_id), {}).get("resumed-as")
        if resumed is not None and not self.target.summary_path.exists():
            logger.warning("run %s was resumed as run %s after a coordinator restart; following it", self.run_id,
                           resumed)
            with self.log.open("a", encoding="utf-8") as handle:
                handle.write(f"resumed as run {resumed} after a coordinator restart; its log: medfed runs logs "
                             f"{resumed} --dir {self.directory}\n")
            self.run_id, self.status = int(resumed), ""
            return False
        return True  # (failure() looks for the summary once more)

    def failure(self) -> str | None:
        if self.target.summary_path.exists():
            return None
        return (f"run {self.run_id} ended ({self.status or 'status unknown'}) without a summary.json; its log: "
                f"medfed runs logs {self.run_id} --dir {self.directory}")

    def stop(self) -> None:
        try:
            self.coordinator.stop_run(self.run_id)
        except MedfedError as exc:  # the search goes on; the run stays listed by `medfed runs list`
            logger.warning("run %s (a pruned or timed-out trial) could not be stopped: %s; stop it with `medfed runs "
                           "stop %s --dir %s`", self.run_id, exc, self.run_id, self.directory)


def deployment_launcher(directory: Path) -> Launcher:
    """Trials as real runs on the coordinator in ``directory``; refused (before anything is written) when it is no
    coordinator directory or its coordinator does not answer."""
    from medfed.cli.coordination import open_coordinator
    from medfed.common.errors import ServiceUnavailable

    coordinator = open_coordinator(directory)
    try:
        coordinator.status()
    except MedfedError as exc:
        raise ServiceUnavailable(
            f"The coordinator in {directory} does not answer ({str(exc).splitlines()[0][:300]}). Start it first: "
            f"medfed coordinator start --dir {directory}") from None

    def launch(run_dir: Path, overrides: list[str], log: Path) -> TrialRun:
        return DeploymentTrial(directory, run_dir, overrides, log)

    return launch


def tune(
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides of the federation (key=value).")] = None,
    trials: Annotated[int, typer.Option("--trials", help="How many recipes to try.")] = 20,
    space: Annotated[str, typer.Option(
        "--space", help="`default` (lr, local steps (epochs under DP-SGD), batch, optimizer, schedule, weight decay, "
        "the strategy's own "
        "options, the clipping norm under DP) or a YAML file mapping each key to `{low: A, high: B}` (add `log: "
        "true` for a log scale) or to a list of choices.")] = "default",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where the trials' run directories, tune.json and best.yaml go (default runs/tune-<time>).",
    )] = None,
    parallel: Annotated[int, typer.Option(
        "--parallel", help="Trials run at once (each a simulation of its own: give each enough cores).")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="The sampler's seed.")] = 0,
    config_file: Annotated[Path | None, typer.Option(
        "--config-file", help="A recipe file to start from (a list of key=value overrides).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Simulated sites' decoded-data cache.")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="The simulated hospitals' state (privacy ledgers) every trial is charged to "
        "(default OUT/state).")] = None,
    trial_timeout: Annotated[float, typer.Option(
        "--trial-timeout", help="Seconds after which a trial is stopped and counted as failed.")] = 24 * 3600.0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Under DP, start without asking.")] = False,
    coordinator: Annotated[Path | None, typer.Option(
        "--dir", help="A coordinator directory: each trial is a real run on its hospitals (`medfed train`), run on "
        "the coordinator's machine; without it the federation is simulated here.")] = None,
) -> None:
    """Search the recipe of a federation on federated validation AUC (Optuna: TPE sampler, median pruner on each
    round's validation): simulated here, or real runs on a coordinator's hospitals with --dir. Every trial is a run
    directory, the test split is never read, and the best recipe is written as OUT/best.yaml for
    `medfed simulate --config-file` or `medfed train --config-file`."""
    from medfed.simulation.tuning import run_tune

    target = out or Path("runs") / f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        launcher = None
        if coordinator is not None:
            _check_deployment_options(parallel=parallel, cache_dir=cache_dir, state_dir=state_dir)
            launcher = deployment_launcher(coordinator)
        base = overrides_with_config_file(config_file, overrides)
        notice = _privacy_notice(base, trials, deployment=coordinator is not None)
        if notice is not None:
            err_console.print(notice, highlight=False, markup=False)
            if not yes and not typer.confirm("Start the search?", default=False, err=True):
                raise typer.Exit(1)
        result = run_tune(base, trials=trials, space=space, out=target, parallel=parallel, seed=seed,
                          cache_dir=cache_dir, state_dir=state_dir, trial_timeout_s=trial_timeout, launcher=launcher,
                          progress=lambda line: err_console.print(line, highlight=False, markup=False))
    except MedfedError as exc:
        fail(exc)
        return
    table = Table(title=f"medfed tune: {len(result.trials)} trials in {result.wall_s:.0f} s (validation only)")
    for name in ("trial", "state", "val AUC", "best round", "rounds", "s"):
        table.add_column(name, justify="left" if name == "state" else "right")
    keys = sorted({k for t in result.trials for k in t.params})
    for key in keys:
        table.add_column(key.split(".", 1)[-1], justify="right")
    ranked = sorted(result.trials, key=lambda t: (t.val_auc is None, -(t.val_auc or 0.0), t.number))
    for t in ranked:
        table.add_row(str(t.number), t.state, f"{t.val_auc:.4f}" if t.val_auc is not None else "-",
                      str(t.best_round or "-"), str(t.rounds), f"{t.wall_s:.0f}",
                      *(_short(t.params.get(k)) for k in keys))
    console.print(folded(table))
    if result.privacy_spent and coordinator is None:
        console.print(f"privacy spent by the whole search: epsilon up to {max(result.privacy_spent.values()):.3g} "
                      f"at the {len(result.privacy_spent)} simulated hospitals' ledgers", highlight=False)
    elif result.privacy_spent:
        console.print("privacy ledgers after the search, as the hospitals reported them (earlier runs included): " +
                      ", ".join(f"{site} epsilon {eps:.3g}" for site, eps in sorted(result.privacy_spent.items())),
                      highlight=False)
    if result.interrupted:
        err_console.print(f"interrupted after {len(result.trials)} trial(s): the runs in progress were stopped; "
                          f"{target}/tune.json holds every trial so far", highlight=False)
    if result.best is None:
        if result.interrupted:
            raise typer.Exit(130)
        fail(MedfedError(f"no trial completed; each trial's reason is in {target}/tune.json and the table above"))
        return
    again = (f"medfed train --dir {coordinator} --config-file {result.best_config}" if coordinator is not None
             else f"medfed simulate --config-file {result.best_config}")
    console.print(f"best: trial {result.best.number}, validation AUC {result.best.val_auc:.4f}; recipe "
                  f"{result.best_config}\nrun it (with the test set): {again}", highlight=False, soft_wrap=True)
    if result.interrupted:
        raise typer.Exit(130)


def _check_deployment_options(*, parallel: int, cache_dir: Path | None, state_dir: Path | None) -> None:
    """Refuse the options of a simulated search that a deployment's search cannot honour."""
    if parallel != 1:  # (usage errors of the command line, not of a config key)
        raise typer.BadParameter(f"--parallel {parallel} with --dir: in a deployment the trials run one at a time "
                                 "(each is a run on every hospital's machine); drop --parallel.")
    for name, value in (("--cache-dir", cache_dir), ("--state-dir", state_dir)):
        if value is not None:
            raise typer.BadParameter(f"{name} with --dir: in a deployment each hospital keeps its own data cache and "
                                     f"privacy ledger on its machine; drop {name}.")


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)
