"""``medfed privacy plan``: every simulated hospital's DP plan for a config, before anything trains.

For each hospital of ``federation.hospitals`` it loads the site's data (decoded once into the cache), reads what its
ledger in ``--state-dir`` already holds, and plans the run as the site will when its first round comes
(:func:`medfed.client.dp_round.preview_run`): the DP-SGD noise, sampling rate and steps per round, the noise of its
metered evaluations, and its epsilon once the run is done; or the reason it would refuse. Nothing is recorded.
``medfed simulate`` under ``privacy=dp`` prints the same table before its first round.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from medfed.cli.display import fail, folded, make_console
from medfed.common.errors import ConfigError, MedfedError

if TYPE_CHECKING:
    from medfed.client.dp_round import RunPreview
    from medfed.common.config import Config

__all__ = ["print_plans", "privacy_app", "site_plans"]

privacy_app = typer.Typer(help="Differential privacy: what each hospital would spend, before a run trains.")
console = make_console()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def site_plans(cfg: Config, cache_dir: Path | None, state_dir: Path | None) -> list[RunPreview]:
    """Each simulated hospital's plan for the run ``cfg`` (``privacy=dp``), as it will make it at its first round."""
    from medfed.client.dp_round import preview_run
    from medfed.client.node import NodeEnv
    from medfed.client.site import resolve_site
    from medfed.common import keys
    from medfed.common.config import DPConfig

    if not isinstance(cfg.privacy, DPConfig) or cfg.privacy.name == "distributed_dp":
        raise ConfigError(f"medfed privacy plan shows each hospital's privacy=dp plan; this config has "
                          f"privacy={cfg.privacy.name}. Add privacy=dp to the overrides (a privacy=distributed_dp run "
                          "has one plan for every hospital: the coordinator logs it at the start and summary.json's "
                          "privacy.assumptions holds it).")
    run_config: dict[str, str] = {}
    if cache_dir is not None:
        run_config[keys.RUN_CACHE_DIR] = str(cache_dir.resolve())
    if state_dir is not None:
        run_config[keys.RUN_STATE_DIR] = str(state_dir.expanduser().resolve())
    plans = []
    for index in range(cfg.federation.hospitals):
        env = NodeEnv.resolve({keys.NODE_PARTITION_ID: index}, run_config)
        plans.append(preview_run(cfg, cfg.privacy, resolve_site(cfg, env), env))
    return plans


def print_plans(console: Console, cfg: Config, plans: list[RunPreview]) -> None:
    """The plans as a table, then each refusal's reason."""
    target = getattr(cfg.privacy, "target_epsilon", math.nan)
    table = Table("site", "train images", "noise", "sampling rate", "steps/round", "rounds", "evaluation noise", "spent",
                  "epsilon after the run", "cap", title=f"DP plan: target epsilon {target:g}, {cfg.train.rounds} rounds")
    for p in plans:
        if p.refusal is not None:
            table.add_row(p.site_id, str(p.n_train), "refuses", "", "", "", "", _fmt(p.spent), "", _fmt(p.cap))
            continue
        table.add_row(p.site_id, str(p.n_train), _fmt(p.noise_multiplier), _fmt(p.sample_rate),
                      str(p.steps_per_round), "all" if p.period == 1 else f"1 in {p.period}",
                      _fmt(p.release_noise), _fmt(p.spent), _fmt(p.epsilon_after_run), _fmt(p.cap))
    console.print(folded(table))
    for p in plans:
        if p.refusal is not None:
            console.print(f"{p.site_id} refuses: {p.refusal}", highlight=False, markup=False)


@privacy_app.command("plan")
def privacy_plan(
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides, key=value (privacy=dp ...).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Simulated sites' decoded-data cache.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Simulated hospitals' state (their ledgers; read only).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plans as JSON.")] = False,
) -> None:
    """Each simulated hospital's DP plan for this config: noise, steps, evaluation noise, epsilon after the run."""
    from medfed.common.config import compose_config

    try:
        cfg = compose_config(list(overrides or []))
        plans = site_plans(cfg, cache_dir, state_dir)
    except MedfedError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in plans], indent=1))
        return
    print_plans(console, cfg, plans)
