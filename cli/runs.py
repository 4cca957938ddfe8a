"""``medfed train`` (launch a run on the coordinator's hospitals) and ``medfed runs`` (list, follow, stop)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from medfed.cli.coordination import CoordDir, launch_run, open_coordinator
from medfed.cli.display import fail, folded, make_console
from medfed.common.config import overrides_with_config_file
from medfed.common.config.advice import advisories
from medfed.common.errors import MedfedError

__all__ = ["runs_app", "train"]

logger = logging.getLogger(__name__)

console = make_console()
err_console = make_console(stderr=True)

runs_app = typer.Typer(help="Training runs on the coordinator: list, follow logs, stop.")


def train(
    directory: CoordDir,
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides, key=value.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where the run's files go.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir from its last checkpoint.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish and show its summary.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="With --wait: print the summary as JSON on stdout (progress goes to stderr).")] = False,
    config_file: Annotated[Path | None, typer.Option(
        "--config-file", help="A recipe file (a list of key=value overrides, e.g. the best.yaml of `medfed tune`); "
        "the overrides given here come after it and win.")] = None,
) -> None:
    """Launch a training run on the coordinator's hospitals (the recipe: model, strategy, rounds, privacy)."""
    from medfed.cli.display import RoundFollower, print_summary
    from medfed.server.runs import RunDirectory

    out = err_console if as_json else console

    try:
        if resume and run_dir is not None and not overrides and config_file is None:
            overrides = RunDirectory(run_dir).read_overrides()
        else:
            overrides = overrides_with_config_file(config_file, overrides)
        run_id, run_path, cfg = launch_run(directory, list(overrides or []), run_dir, resume=resume)
    except MedfedError as exc:
        fail(exc)
        return
    out.print(f"run {run_id} launched -> {run_path}")
    for advice in advisories(cfg, deployment=True):
        err_console.print(f"[yellow]warning:[/] {escape(advice)}", highlight=False)
    online = sum(1 for node in open_coordinator(directory).nodes() if node.get("status") == "online")
    if online < cfg.strategy.min_available_nodes:
        err_console.print(
            f"[yellow]warning:[/] {online} hospital(s) online; the first round starts when "
            f"strategy.min_available_nodes={cfg.strategy.min_available_nodes} are (see `medfed hospitals list`)."
        )
    if wait:
        target = RunDirectory(run_path)
        next_status = time.monotonic() + 10
        with RoundFollower(target.metrics_path, cfg.train.rounds, out):
            while not target.summary_path.exists():
                if time.monotonic() >= next_status:  # Flower's CLI is a process start: ask it now and then
                    next_status = time.monotonic() + 10
                    status = open_coordinator(directory).status(run_id)
                    if status and str(status[0].get("status", "")).startswith("finished") and not (
                        target.summary_path.exists()
                    ):
                        err_console.print(f"run {run_id} ended: {status[0].get('status')}")
                        raise typer.Exit(1)
                time.sleep(0.5)
        summary = target.read_summary()
        failed = target.unanswered(summary) or target.trained_nowhere()
        if failed is not None:  # no hospital trained: no result to stand behind, so no result table
            fail(failed)
        if as_json:
            typer.echo(json.dumps(summary, indent=1))
        else:
            print_summary(console, summary, f"medfed train: run {run_id}")


@runs_app.command("list")
def runs_list(
    directory: CoordDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """Every run of this coordinator with its status and run directory."""
    try:
        coordinator = open_coordinator(directory)
        runs, index = coordinator.status(), coordinator.runs()
    except MedfedError as exc:
        fail(exc)
        return
    rows = [{"run-id": str(run.get("run-id")), "status": run.get("status"), "elapsed-s": float(run.get("elapsed", 0)),
             "run-dir": index.get(str(run.get("run-id")), {}).get("run-dir")} for run in runs]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table("run id", "status", "elapsed s", "run dir")
    for row in rows:
        table.add_row(str(row["run-id"]), str(row["status"]), f"{row['elapsed-s']:.0f}", str(row["run-dir"] or "-"))
    console.print(folded(table))


@runs_app.command("stop")
def runs_stop(run_id: int, directory: CoordDir) -> None:
    """Stop a run (hospitals finish nothing further for it)."""
    try:
        open_coordinator(directory).stop_run(run_id)
    except MedfedError as exc:
        fail(exc)
    console.print(f"run {run_id} stopped")


@runs_app.command("logs")
def runs_logs(run_id: int, directory: CoordDir, follow: Annotated[bool, typer.Option("--follow")] = False) -> None:
    """The ServerApp's log of a run (Flower's `flwr log`)."""
    import subprocess

    from medfed.common.environment import script
    from medfed.server.coordinator import CONNECTION

    try:
        coordinator = open_coordinator(directory)
    except MedfedError as exc:
        fail(exc)
        return
    args = [script("flwr"), "log", str(run_id), CONNECTION] + ([] if follow else ["--show"])
    raise typer.Exit(subprocess.call(args, env=coordinator.environment()))
