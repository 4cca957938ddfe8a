"""``medfed demo``: the first run, which shows what federation is for and what privacy costs.

On the BreastMNIST file shipped with medfed (:mod:`medfed.common.data.demo`; offline, no download), split over
5 simulated hospitals with label skew (Dirichlet alpha 0.5, seed 0), three runs, each a run directory of its own
under RUN_DIR:

* ``local``: each hospital alone on its own images (:func:`medfed.simulation.baselines.run_local`, as
  ``medfed baseline local``);
* ``fedavg``: the five together with FedAvg in Flower's simulation runtime (as ``medfed simulate``), with the same
  model and training budget (:data:`DEMO_RECIPE`);
* ``dp``: the same federation with DP-SGD at every hospital (``privacy=dp``, epsilon 8 per hospital), on the model
  DP affords on sites this small (:data:`DEMO_PRIVATE`).

It prints the three side by side (test AUC and accuracy on the official test split, each model taken at its best
validation round), writes them to RUN_DIR/demo.json and points to the report and the consoles. Extra overrides
(``medfed demo train.rounds=3``) apply to every run. The simulated hospitals' privacy ledgers live in RUN_DIR/state,
so running the demo again never spends the privacy of an earlier demo or of another run.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table

from medfed.cli.display import fail, fmt, folded, make_console
from medfed.common.config import Config, compose_config, config_to_yaml, override_key
from medfed.common.errors import DatasetUnavailableError, MedfedError

__all__ = ["DEMO_FEDERATION", "DEMO_PRIVATE", "DEMO_RECIPE", "DEMO_THREADS", "DemoRow", "DemoStep", "demo",
           "demo_steps", "demo_table"]

logger = logging.getLogger(__name__)

DEMO_FEDERATION: tuple[str, ...] = (
    "federation.hospitals=5", "federation.partition=dirichlet", "federation.alpha=0.5", "federation.seed=0",
)
"""Five hospitals with label skew, as in the BreastMNIST benchmark (docs/benchmarks.md)."""

DEMO_RECIPE: tuple[str, ...] = ("model=smallcnn", "train.rounds=8", "train.local_epochs=8")
"""The model and training budget of the local-only and the federated run. Chosen on FedAvg's best federated
validation AUC (never the test split) among budgets that keep the whole demo under 3 minutes on 2 cores: rounds x
local epochs 8x8 0.781, 20x3 0.758, 7x8 0.757, 12x5 0.749, 6x10 0.740, 15x4 0.737, 10x5 0.706, 6x8 0.706 (1 thread,
2 hospitals at a time); the BreastMNIST benchmark's 30x10 (docs/benchmarks.md) trains about 5 times as long."""

DEMO_THREADS: tuple[str, ...] = ("federation.threads=1", "federation.parallel=2")
"""One torch thread per trainer and two simulated hospitals at a time: on 2 cores no trainer waits on another's
threads (with 2 threads per trainer, a second busy process made an epoch ~10x slower here)."""

DEMO_PRIVATE: tuple[str, ...] = ("model=scatternet", "privacy=dp")
"""The DP run: DP-SGD at every hospital on a fixed wavelet front end with a trainable linear head, with the
training defaults ``privacy=dp`` picks for it (:data:`medfed.common.config.private_recipes.HEAD_DP_RECIPE`); a
smallcnn trained with DP-SGD is both slower and, on BreastMNIST, less accurate (docs/benchmarks.md)."""

DEMO_EPSILON = 8.0
"""The DP row's privacy budget per hospital (``privacy.target_epsilon``; delta 1e-5)."""


@dataclass(frozen=True)
class DemoStep:
    """One row of the demo: a run of its own in RUN_DIR/``key``."""

    key: str
    label: str
    what: str
    baseline: bool  # the local-only baseline, else a simulated federation
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class DemoRow:
    """What the table shows of one finished step."""

    key: str
    label: str
    what: str
    test_auc: float
    test_acc: float
    test_auc_range: tuple[float, float] | None  # local-only: the worst and the best hospital
    best_round: int | None
    recipe: str  # the model and its budget, e.g. "smallcnn 8x8" (rounds x local epochs)
    epsilon: float | None
    wall_s: float
    run_dir: str


def _merged(base: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
    """``base`` without the keys ``extra`` sets, then ``extra`` (Hydra refuses a key given twice)."""
    named = {override_key(o) for o in extra}
    return tuple(o for o in base if override_key(o) not in named) + tuple(extra)


def demo_steps(data_dir: Path, *, dp: bool = True, extra: Sequence[str] = ()) -> list[DemoStep]:
    """The demo's runs on the BreastMNIST file in ``data_dir``; ``extra`` overrides apply to each."""
    from medfed.common.data.demo import DEMO_DATASET

    data = ("dataset=medmnist", f"dataset.name={DEMO_DATASET}", f"dataset.data_path={data_dir}", *DEMO_FEDERATION,
            *DEMO_THREADS)
    steps = [
        DemoStep("local", "local-only", "each hospital alone, on its own images", True,
                 _merged((*data, *DEMO_RECIPE), extra)),
        DemoStep("fedavg", "federated (FedAvg)", "the 5 together; only model weights leave a site", False,
                 _merged((*data, *DEMO_RECIPE), extra)),
    ]
    if dp:
        steps.append(DemoStep(
            "dp", "federated + DP", f"the same, DP-SGD at every site (epsilon <= {DEMO_EPSILON:g})", False,
            _merged((*data, *DEMO_PRIVATE, f"privacy.target_epsilon={DEMO_EPSILON:g}"), extra),
        ))
    return steps


@contextmanager
def _progress(console: Console, label: str, metrics: Path, rounds: int) -> Iterator[None]:
    """A spinner with the step's last finished round while it runs (terminals only; a pipe sees the result lines)."""
    stop = threading.Event()
    with console.status(f"{label}: starting") as status:

        def follow() -> None:
            while not stop.wait(0.5):
                done = len(metrics.read_text(encoding="utf-8").splitlines()) if metrics.is_file() else 0
                status.update(f"{label}: round {done}/{rounds}")

        thread = threading.Thread(target=follow, name="medfed-demo-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def _run_step(step: DemoStep, run_path: Path, *, cache_dir: Path, state_dir: Path, verbose: bool,
              console: Console) -> tuple[Config, dict[str, Any]]:
    """Run one step as ``medfed baseline local`` / ``medfed simulate`` would (in this process); its config and
    summary."""
    from medfed.server.runs import RunDirectory

    cfg = compose_config(step.overrides)
    target = RunDirectory(run_path)
    target.write_config(config_to_yaml(cfg), step.overrides)
    t0 = time.time()
    with _progress(console, step.label, target.metrics_path, cfg.train.rounds):
        if step.baseline:
            from medfed.simulation.baselines import run_local

            return cfg, run_local(cfg, target, cache_dir=cache_dir, t0=t0)
        from medfed.simulation.launcher import run_simulation

        run_simulation(cfg, step.overrides, run_path, cache_dir=cache_dir, state_dir=state_dir, t0=t0,
                       verbose=verbose)
    summary = target.read_summary()
    failed = target.unanswered(summary) or target.trained_nowhere()
    if failed is not None:
        raise failed
    return cfg, summary


def _number(value: Any) -> float:
    """A metric of a summary as a float; NaN where it is missing or undefined (null)."""
    return math.nan if value is None else float(value)


def _row(step: DemoStep, cfg: Config, summary: dict[str, Any], wall_s: float, run_path: Path) -> DemoRow:
    best = summary.get("best") or {}
    test = best.get("test") or {}
    spread = ((summary.get("local") or {}).get("test_auc") or {}) if step.baseline else {}
    privacy = summary.get("privacy") or {}
    return DemoRow(
        key=step.key, label=step.label, what=step.what,
        test_auc=_number(test.get("auc")), test_acc=_number(test.get("acc")),
        test_auc_range=(float(spread["min"]), float(spread["max"])) if spread else None,
        best_round=best.get("round"), recipe=f"{cfg.model.name} {cfg.train.rounds}x{cfg.train.work()}",
        epsilon=privacy.get("max_epsilon"), wall_s=wall_s, run_dir=str(run_path),
    )


def demo_table(rows: Sequence[DemoRow], title: str) -> Table:
    """Local-only, federated and federated + DP side by side."""
    table = Table(title=title)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("", "left"), ("who trains on what", "left"), ("model rounds x epochs", "left"), ("test AUC", "right"),
        ("test acc", "right"), ("epsilon", "right"), ("s", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for row in rows:
        auc = fmt(row.test_auc)
        if row.test_auc_range is not None:
            auc += f" ({fmt(row.test_auc_range[0], 2)}-{fmt(row.test_auc_range[1], 2)})"
        table.add_row(row.label, row.what, row.recipe, auc, fmt(row.test_acc), fmt(row.epsilon, 2),
                      fmt(row.wall_s, 0))
    table.caption = ("test: the official test split (156 images no hospital holds), each model at its best "
                     "validation round; local-only: the mean of the 5 hospitals' own models (worst-best). scatternet: "
                     "fixed wavelet features and a linear head, the model DP affords on sites this small.")
    return table


def _next_steps(console: Console, rows: Sequence[DemoRow], run_path: Path) -> None:
    by_key = {row.key: row for row in rows}
    local, fed, dp = by_key.get("local"), by_key.get("fedavg"), by_key.get("dp")
    if local and fed:
        console.print(f"federation: test AUC {fmt(fed.test_auc)} against {fmt(local.test_auc)} for a hospital alone "
                      f"({fed.test_auc - local.test_auc:+.3f})", highlight=False)
    if fed and dp:
        gap = fed.test_auc - dp.test_auc
        console.print(f"privacy: test AUC {fmt(dp.test_auc)} with every hospital's images protected by DP (epsilon "
                      f"{fmt(dp.epsilon, 2)} spent at most), {abs(gap):.3f} {'below' if gap >= 0 else 'above'} "
                      "FedAvg's smallcnn without it", highlight=False)
    console.print(f"\noutputs in {run_path}/ (demo.json; one run directory per row: "
                  f"{', '.join(row.key for row in rows)})", highlight=False)
    console.print("next:", highlight=False)
    if fed:
        console.print(f"  medfed report {fed.run_dir}    # the federated run's report: RUN_DIR/report.html, "
                      "per-round and per-hospital plots", highlight=False, soft_wrap=True)
    console.print("  medfed coordinator console --dir COORD_DIR   # web console of a real deployment's coordinator: "
                  "hospitals, runs, live rounds (README, Deployment)", highlight=False, soft_wrap=True)
    console.print("  medfed hospital console --config site.yaml   # a hospital's own console: what left the site, "
                  "its privacy ledger, app approvals (docs/operations.md)", highlight=False, soft_wrap=True)


Overrides = Annotated[list[str] | None, typer.Argument(
    help="Hydra overrides applied to every run of the demo (e.g. train.rounds=3 for a quick look).")]


def demo(
    overrides: Overrides = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Where the demo's runs go (default: runs/demo-<time>).")] = None,
    data_path: Annotated[Path | None, typer.Option(
        "--data-path", help="A folder holding breastmnist.npz (default: the file shipped with medfed).")] = None,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="Add the federated run under differential privacy.")] = True,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Simulated sites' decoded-data cache (default ~/.cache/medfed).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and medfed's INFO logs.")] = False,
) -> None:
    """The first run: BreastMNIST (shipped with medfed) over 5 hospitals with label skew, each hospital alone against
    the federation (and the federation under DP), side by side; offline, a few minutes on 2 cores."""
    from medfed.client.site import default_cache_dir
    from medfed.common.data.demo import DEMO_DATASET, demo_data_dir

    console = make_console()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    started = time.time()
    run_path = run_dir or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    rows: list[DemoRow] = []
    try:
        data_dir = (data_path or demo_data_dir()).expanduser().resolve()
        if not (data_dir / f"{DEMO_DATASET}.npz").is_file():
            raise DatasetUnavailableError(
                f"--data-path {data_dir} holds no {DEMO_DATASET}.npz; leave --data-path out to use the file shipped "
                "with medfed, or point it at a folder holding the official MedMNIST file."
            )
        steps = demo_steps(data_dir, dp=dp, extra=list(overrides or []))
        for step in steps:  # the whole recipe is checked before the first run starts
            compose_config(step.overrides)
        shipped = "shipped with medfed, " if data_path is None else ""
        console.print(
            f"BreastMNIST ({shipped}MedMNIST v2, CC BY 4.0; {data_dir / 'breastmnist.npz'}): 780 breast ultrasound "
            "images, malignant vs normal/benign, over 5 simulated hospitals with label skew (Dirichlet alpha 0.5)",
            highlight=False, soft_wrap=True,
        )
        for number, step in enumerate(steps, 1):
            console.print(f"[bold][{number}/{len(steps)}] {step.label}[/]: {step.what}", highlight=False)
            step_started = time.time()
            cfg, summary = _run_step(step, run_path / step.key, cache_dir=cache_dir or default_cache_dir(),
                                state_dir=run_path / "state", verbose=verbose, console=console)
            rows.append(_row(step, cfg, summary, time.time() - step_started, run_path / step.key))
            if step.baseline:
                sizes = [str((site or {}).get("n_train", "?")) for _, site in sorted(summary.get("sites", {}).items())]
                console.print(f"  hospitals' training images: {', '.join(sizes)}", highlight=False)
            console.print(f"  test AUC {fmt(rows[-1].test_auc)}, {fmt(rows[-1].wall_s, 0)} s", highlight=False)
    except MedfedError as exc:
        fail(exc)
    wall = time.time() - started
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "demo.json").write_text(
        json.dumps({"wall_s": wall, "data": str(data_dir), "rows": [asdict(row) for row in rows]}, indent=1) + "\n",
        encoding="utf-8",
    )
    console.print(folded(demo_table(rows, f"medfed demo: BreastMNIST, 5 hospitals, {wall:.0f} s in all")))
    _next_steps(console, rows, run_path)
