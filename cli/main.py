"""The ``medfed`` command: simulate a federation, run the baselines, show the config.

Arguments after the options are Hydra overrides (``key=value``), e.g.
``medfed simulate dataset=medmnist dataset.name=breastmnist federation.hospitals=5 train.rounds=20``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from medfed.cli.demo import demo
from medfed.cli.deploy import register_commands
from medfed.cli.display import RoundFollower, fail, make_console, print_summary
from medfed.cli.privacy_plan import print_plans, privacy_app, site_plans
from medfed.cli.tune import tune
from medfed.common.config import Config, compose_config, config_to_yaml, overrides_with_config_file
from medfed.common.config.advice import advisories
from medfed.common.environment import flower_environment
from medfed.common.errors import ConfigError, MedfedError

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="medfed",
    help="Federated learning for hospitals: train one classifier together without sharing a single image.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
baseline_app = typer.Typer(help="Baselines on the same config, model and training budget as `simulate`.")
config_app = typer.Typer(help="Inspect the composed configuration.")
weights_app = typer.Typer(help="Pretrained weights: fetch them once into a local file for model.pretrained=PATH.")
app.add_typer(baseline_app, name="baseline")
app.add_typer(config_app, name="config")
app.add_typer(weights_app, name="weights")
app.add_typer(privacy_app, name="privacy")
register_commands(app)
app.command()(demo)
app.command()(tune)

console = make_console()
err_console = make_console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Hydra overrides, key=value (e.g. train.rounds=20).")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Where the run's files go (default: runs/<time>).")]
CacheOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Simulated sites' decoded-data cache (default ~/.cache/medfed).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and medfed's INFO logs.")]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Run the simulated hospitals on this Ray cluster: auto (the one `ray start` started on this machine) or "
        "HOST:PORT of its head node; the same as the override federation.ray_address=...",
    ),
]
ConfigFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--config-file",
        help="A recipe file: a list of key=value overrides (e.g. the best.yaml `medfed tune` writes, or a run's "
        "overrides.json); the overrides given on the command line come after it and win.",
    ),
]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Simulated hospitals' state: their privacy ledgers, which span runs on the same data "
        "(default ~/.local/share/medfed, or $MEDFED_STATE_DIR).",
    ),
]


class RunDirectoryInUse(ConfigError):
    """A fresh run was pointed at a directory that already holds a run."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            f"--run-dir {run_dir} already holds a run (metrics.jsonl exists). Continue it with "
            f"`medfed simulate --resume {run_dir}`, or choose another --run-dir."
        )


class RayAddressTwice(ConfigError):
    """--ray-address and a federation.ray_address override disagree."""

    def __init__(self, option: str, override: str) -> None:
        super().__init__(
            f"--ray-address {option} and the override {override} name two clusters; give the cluster once (the "
            "option is the same as the override)."
        )


def _with_ray_address(overrides: list[str], ray_address: str | None, *, resumed: bool = False) -> list[str]:
    """``overrides`` with ``--ray-address`` as the override ``federation.ray_address`` (quoted for Hydra, so an IPv6
    ``[::1]:6379`` parses). An override naming another cluster is refused; a resumed run's own is replaced (where a
    run continues is not part of its recipe)."""
    if ray_address is None:
        return overrides
    value = f"'{ray_address}'" if "'" not in ray_address else ray_address
    kept = []
    for given in overrides:
        key, _, other = given.partition("=")
        if key.lstrip("+~") == "federation.ray_address":
            if resumed:
                continue
            if other.strip("'\"") != ray_address:
                raise RayAddressTwice(ray_address, given)
        kept.append(given)
    return [*kept, f"federation.ray_address={value}"]


class ResumeWithOverrides(ConfigError):
    """--resume was given together with overrides."""

    def __init__(self) -> None:
        super().__init__(
            "--resume continues a run with the config it was started with; drop the overrides (and --config-file), "
            "or start a new run with --run-dir."
        )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _cache_dir(option: Path | None) -> Path:
    from medfed.client.site import default_cache_dir

    return option if option is not None else default_cache_dir()


def _state_dir(option: Path | None) -> Path:
    from medfed.client.privacy import default_state_dir

    return option if option is not None else default_state_dir()


def _check_registries(cfg: Config) -> None:
    """Names resolved through registries (model, strategy) and the pretrained weights file are checked before
    anything starts."""
    from medfed.common.models.registry import require_model
    from medfed.strategies import require_strategy

    require_model(cfg.model.name)
    require_strategy(cfg.strategy.name)
    if cfg.model.pretrained:  # a missing or unreadable weights file is refused before any process starts
        from medfed.common.models.pretrained import read_state_dict

        read_state_dict(cfg.model.pretrained)


def _prepare(overrides: list[str], run_dir: Path, *, fresh: bool) -> Config:
    from medfed.server.runs import RunDirectory

    cfg = compose_config(overrides)
    _check_registries(cfg)
    if fresh:
        target = RunDirectory(run_dir)
        if target.metrics_path.exists():
            raise RunDirectoryInUse(run_dir)
        target.write_config(config_to_yaml(cfg), overrides)
    return cfg


def _show(summary: dict[str, Any], title: str) -> None:
    print_summary(console, summary, title)


@app.command()
def simulate(
    overrides: Overrides = None,
    run_dir: RunDirOpt = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory from its last checkpoint.")
    ] = None,
    cache_dir: CacheOpt = None,
    state_dir: StateOpt = None,
    ray_address: RayAddressOpt = None,
    verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout (progress and plans go to stderr).")] = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """Simulate a federation of hospitals on one machine, or on a Ray cluster (Flower simulation runtime)."""
    from medfed.simulation.launcher import run_simulation
    from medfed.server.runs import RunDirectory

    out = err_console if as_json else console
    _setup_logging(verbose)
    t0 = time.time()
    try:
        if resume is not None:
            if overrides or config_file is not None:
                raise ResumeWithOverrides()
            target = RunDirectory(resume)
            overrides = _with_ray_address(target.read_overrides(), ray_address, resumed=True)
            cfg = compose_config(overrides)
            checkpoint = target.last_checkpoint_path
            done = 0
            if checkpoint.is_file():
                from medfed.common.models.weights import load_checkpoint

                done = int(load_checkpoint(checkpoint)[1].get("round", 0))
            run_path = resume
            out.print(f"resuming [bold]{resume}[/] after round {done} of {cfg.train.rounds}")
        else:
            overrides = _with_ray_address(overrides_with_config_file(config_file, overrides), ray_address)
            run_path = run_dir or _default_run_dir("sim")
            cfg = _prepare(overrides, run_path, fresh=True)
            done = 0
            out.print(
                f"simulating [bold]{cfg.federation.hospitals}[/] hospitals on [bold]{cfg.dataset.name}[/] "
                f"({cfg.federation.partition}), {cfg.train.rounds} rounds of {cfg.strategy.name} -> {run_path}"
            )
            if cfg.federation.ray_address:
                out.print(f"on the Ray cluster at [bold]{cfg.federation.ray_address}[/] (this process joins it)")
            for advice in advisories(cfg):
                err_console.print(f"[yellow]warning:[/] {escape(advice)}", highlight=False)
            if cfg.privacy.name == "dp":  # every hospital's plan, before round 1 (what each will spend)
                print_plans(out, cfg, site_plans(cfg, _cache_dir(cache_dir), _state_dir(state_dir)))
        with RoundFollower(RunDirectory(run_path).metrics_path, cfg.train.rounds, out, skip_rounds=done):
            run_simulation(
                cfg, overrides, run_path, resume=resume is not None, cache_dir=_cache_dir(cache_dir),
                state_dir=_state_dir(state_dir), t0=t0,
                verbose=verbose,
            )
        summary = RunDirectory(run_path).read_summary()
    except MedfedError as exc:
        fail(exc)
        return
    failed = RunDirectory(run_path).unanswered(summary) or RunDirectory(run_path).trained_nowhere()
    if failed is not None:  # no hospital trained: no result to stand behind, so no result table
        fail(failed)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    _show(summary, f"medfed simulate: {cfg.strategy.name} on {cfg.dataset.name}")
    console.print(f"outputs in {run_path}/ (config.yaml, metrics.jsonl, summary.json, model.pt)")
    if cfg.task == "ssl":
        quality = summary.get("representation") or {}
        console.print(
            f"self-supervised encoder (best validation {cfg.ssl.method} loss): {run_path}/best_model.pt; test-set "
            f"silhouette {quality.get('silhouette', float('nan')):.3f}, Davies-Bouldin "
            f"{quality.get('davies_bouldin', float('nan')):.3f}. Fine-tune it with model.pretrained={run_path}/best_model.pt"
        )


def _baseline(kind: str, overrides: list[str] | None, run_dir: Path | None, cache_dir: Path | None, verbose: bool,
              config_file: Path | None = None):
    from medfed.simulation.baselines import run_centralized, run_local
    from medfed.server.runs import RunDirectory

    _setup_logging(verbose)
    t0 = time.time()
    try:
        overrides = overrides_with_config_file(config_file, overrides)
        run_path = run_dir or _default_run_dir(kind)
        cfg = _prepare(overrides, run_path, fresh=True)
        console.print(
            f"{kind} baseline on [bold]{cfg.dataset.name}[/] ({cfg.federation.hospitals} hospitals' data), "
            f"{cfg.train.rounds} rounds x {cfg.train.work()} -> {run_path}"
        )
        if cfg.task != "classify":
            raise ConfigError(
                f"The baselines are supervised references; task={cfg.task} has no {kind} baseline. Compare a "
                "supervised run that starts from the SSL encoder (model.pretrained=...) with one that does not."
            )
        runner = run_centralized if kind == "centralized" else run_local
        with RoundFollower(RunDirectory(run_path).metrics_path, cfg.train.rounds, console):
            summary = runner(cfg, RunDirectory(run_path), cache_dir=_cache_dir(cache_dir), t0=t0)
    except MedfedError as exc:
        fail(exc)
        return
    _show(summary, f"medfed baseline {kind} on {cfg.dataset.name}")
    console.print(f"outputs in {run_path}/")


@baseline_app.command("centralized")
def baseline_centralized(
    overrides: Overrides = None, run_dir: RunDirOpt = None, cache_dir: CacheOpt = None, verbose: VerboseOpt = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """All hospitals' training data pooled into one model (the upper reference)."""
    _baseline("centralized", overrides, run_dir, cache_dir, verbose, config_file)


@baseline_app.command("local")
def baseline_local(
    overrides: Overrides = None, run_dir: RunDirOpt = None, cache_dir: CacheOpt = None, verbose: VerboseOpt = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """Each hospital alone, on its own data (the lower reference)."""
    _baseline("local", overrides, run_dir, cache_dir, verbose, config_file)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's directory.")],
) -> None:
    """Write RUN_DIR/report.html (self-contained, plots embedded) and the plots as RUN_DIR/report/*.png."""
    from medfed.cli.report import write_report

    try:
        page = write_report(run_dir)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"wrote {page} (plots in {page.parent / 'report'}/)")


@config_app.command("show")
def config_show(overrides: Overrides = None) -> None:
    """Print the composed config for these overrides (every key can be overridden)."""
    try:
        cfg = compose_config(list(overrides or []))
    except MedfedError as exc:
        fail(exc)
        return
    console.print(config_to_yaml(cfg), highlight=False, markup=False)


@weights_app.command("fetch")
def weights_fetch(
    spec: Annotated[str, typer.Argument(help="A known name (torchvision:resnet18, torchvision:resnet34) or a URL.")],
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to keep it (default ~/.cache/medfed/weights, or $MEDFED_WEIGHTS_DIR)."),
    ] = None,
) -> None:
    """Download pretrained weights (the only medfed command that goes online) and print the local file to pass as
    model.pretrained=PATH; a file already fetched is reused."""
    from medfed.common.models.hub import fetch_weights

    try:
        path = fetch_weights(spec, directory, progress=sys.stderr.isatty())
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"{path}\nstart a run from it with model.pretrained={path}", highlight=False, markup=False,
                  soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    flower_environment()
    app(prog_name="medfed")


if __name__ == "__main__":  # pragma: no cover
    main()
