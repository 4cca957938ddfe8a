"""``medfed tune``: a hyperparameter search over a simulated federation (medfed.simulation.tuning)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed.cli.display import fail, folded, make_console
from medfed.common.config import compose_config, overrides_with_config_file
from medfed.common.errors import MedfedError

__all__ = ["tune"]

console = make_console()
err_console = make_console(stderr=True)


def _privacy_notice(overrides: list[str], trials: int) -> str | None:
    """Under DP, what the search will cost the simulated hospitals (None without DP)."""
    cfg = compose_config(overrides)
    if cfg.privacy.name not in ("dp", "distributed_dp", "central_dp"):
        return None
    target = getattr(cfg.privacy, "target_epsilon", math.nan)
    return (f"privacy={cfg.privacy.name}: each of the {trials} trials is a run on the hospitals' data, charged to "
            f"their privacy ledgers like any run (up to epsilon {target:g} per trial and hospital, composed over the "
            "trials: tuning spends privacy too).")


def tune(
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides of the federation (key=value).")] = None,
    trials: Annotated[int, typer.Option("--trials", help="How many recipes to try.")] = 20,
    space: Annotated[str, typer.Option(
        "--space", help="`default` (lr, local epochs, batch, optimizer, schedule, weight decay, the strategy's own "
        "options, the clipping norm under DP) or a YAML file mapping each key to `{low: A, high: B}` (add `log: "
        "true` for a log scale) or to a list of choices.")] = "default",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where the trials' run directories, tune.json and best.yaml go (default runs/tune-<time>).")] = None,
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
) -> None:
    """Search the recipe of a simulated federation on federated validation AUC (Optuna: TPE sampler, median pruner
    on each round's validation); every trial is a run directory, the test split is never read, and the best recipe
    is written as OUT/best.yaml for `medfed simulate --config-file`."""
    from medfed.simulation.tuning import run_tune

    target = out or Path("runs") / f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        base = overrides_with_config_file(config_file, overrides)
        notice = _privacy_notice(base, trials)
        if notice is not None:
            err_console.print(notice, highlight=False, markup=False)
            if not yes and not typer.confirm("Start the search?", default=False, err=True):
                raise typer.Exit(1)
        console.print(f"tuning {trials} trials ({parallel} at a time) -> {target}", highlight=False)
        result = run_tune(base, trials=trials, space=space, out=target, parallel=parallel, seed=seed,
                          cache_dir=cache_dir, state_dir=state_dir, trial_timeout_s=trial_timeout,
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
    if result.privacy_spent:
        console.print(f"privacy spent by the whole search: epsilon up to {max(result.privacy_spent.values()):.3g} "
                      f"at the {len(result.privacy_spent)} simulated hospitals' ledgers", highlight=False)
    if result.best is None:
        fail(MedfedError(f"no trial completed; see the trial logs in {target}/"))
        return
    console.print(f"best: trial {result.best.number}, validation AUC {result.best.val_auc:.4f}; recipe "
                  f"{result.best_config}\nrun it (with the test set): medfed simulate --config-file "
                  f"{result.best_config}", highlight=False, soft_wrap=True)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)
