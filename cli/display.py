"""Terminal output of runs: a live per-round progress line and the final summary table (rich)."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from medfed.common.errors import EXIT_CODES, MedfedError

__all__ = ["RoundFollower", "fail", "fmt", "folded", "make_console", "print_round", "summary_table"]

logger = logging.getLogger(__name__)

WIDE = 240  # the width of output that is no terminal (a pipe, a file, a CI log): rich would cut it at 80 columns


def make_console(*, stderr: bool = False) -> Console:
    """A console whose tables are never cut: a terminal's own width (tables fold long cells, see :func:`folded`),
    else ``WIDE`` columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else WIDE)


def folded(table: Table) -> Table:
    """``table`` with every column folding a long value (a run directory, a sha256) onto more lines instead of
    cutting it with an ellipsis."""
    for column in table.columns:
        column.overflow = "fold"
    return table


def fail(exc: MedfedError) -> NoReturn:
    """Print a medfed error and what its exit code means on stderr, then exit with that code."""
    err = make_console(stderr=True)
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    err.print(f"[dim]{EXIT_CODES.get(exc.exit_code, '')}[/]", highlight=False)
    raise typer.Exit(exc.exit_code)


def fmt(value: Any, digits: int = 3) -> str:
    """A metric for humans: fixed digits, '-' when missing or undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_round(console: Console, record: Mapping[str, Any], total_rounds: int) -> None:
    """One line per finished round: losses, federated validation and test AUC, sites, time."""
    sites = record.get("sites") or {}
    dropped = record.get("dropped") or []
    val = record.get("val") or {}
    test = record.get("test") or {}
    epsilons = {k: v["epsilon"] for k, v in sorted(sites.items()) if (v or {}).get("epsilon") is not None}
    privacy = (
        " | eps " + " ".join(f"{k.rsplit('-', 1)[-1]}:{fmt(e, 2)}" for k, e in epsilons.items()) if epsilons else ""
    )
    scores = (f"val AUC {fmt(val.get('auc'))} acc {fmt(val.get('acc'))} | test AUC {fmt(test.get('auc'))}"
              if "auc" in val or "auc" in test or not val  # a classifier; SSL runs report their pretext losses
              else f"val loss {fmt(val.get('loss'))} | test loss {fmt(test.get('loss'))}")
    console.print(
        f"[bold]round {record.get('round')}/{total_rounds}[/] | "
        f"loss {fmt((record.get('train') or {}).get('loss'))} | {scores} | "
        f"{len(sites)} sites" + (f" [red]{len(dropped)} dropped[/]" if dropped else "") + privacy + " | "
        f"{fmt(record.get('elapsed_s'), 0)} s",
        highlight=False,
        soft_wrap=True,
    )
    for drop in dropped:
        console.print(
            f"  [red]{drop.get('site')} ({drop.get('phase')}):[/] {drop.get('reason')}", highlight=False, soft_wrap=True
        )


class RoundFollower:
    """Follows ``metrics.jsonl`` in a background thread and prints each new round as it lands."""

    def __init__(self, metrics_path: Path, total_rounds: int, console: Console, *, skip_rounds: int = 0) -> None:
        self.metrics_path = metrics_path
        self.total_rounds = total_rounds
        self.console = console
        self.skip_rounds = skip_rounds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medfed-progress", daemon=True)
        self._offset = 0

    def __enter__(self) -> RoundFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # whatever landed last

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        if not self.metrics_path.is_file():
            return
        with self.metrics_path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            while True:
                line = handle.readline()
                if not line.endswith("\n"):
                    break
                self._offset = handle.tell()
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(record.get("round", 0)) > self.skip_rounds:
                    print_round(self.console, record, self.total_rounds)


def operating_point_table(summary: Mapping[str, Any]) -> Table | None:
    """Binary tasks: decisions at the threshold the hospitals' validation counts chose, beside those at 0.5."""
    point = summary.get("operating_point")
    if not point:
        return None
    table = Table(title=f"decision threshold {fmt(point.get('threshold'), 2)} (chosen on validation, round "
                        f"{fmt(point.get('round'))})")
    table.add_column("")
    for name in ("threshold", "bal acc", "sensitivity", "specificity", "acc"):
        table.add_column(name, justify="right")
    for label, threshold, *rates in operating_point_rows(point):
        table.add_row(label, fmt(threshold, 2), *(fmt(r) for r in rates))
    return table


def operating_point_rows(point: Mapping[str, Any]) -> list[list[Any]]:
    """The operating point's rows, as values: decisions, threshold, balanced accuracy, sensitivity, specificity,
    accuracy (validation pooled, test at the threshold, test at 0.5; a part the summary lacks is left out)."""
    parts = (("validation (pooled)", point.get("val"), point.get("threshold")),
             ("test at the threshold", point.get("test"), point.get("threshold")),
             ("test at 0.5", point.get("test_at_0.5"), 0.5))
    return [[label, threshold, *(values.get(k) for k in ("bal_acc", "sensitivity", "specificity", "acc"))]
            for label, values, threshold in parts if values]


def audit_table(summary: Mapping[str, Any]) -> Table | None:
    """The privacy audit: each hospital's membership-inference attack on the selected model (outside DP)."""
    audit = summary.get("audit")
    if not audit or not audit.get("sites"):
        return None
    attacks = sorted({a for site in audit["sites"].values() for a in site})
    table = Table(title=f"privacy audit (membership inference, round {fmt(audit.get('round'))}; not covered by DP)")
    table.add_column("hospital")
    for attack in attacks:
        for name in ("AUC", "TPR@1%", "TPR@0.1%"):
            table.add_column(f"{attack} {name}", justify="right")
    for site_id, per_attack in sorted(audit["sites"].items()):
        cells = []
        for attack in attacks:
            values = per_attack.get(attack, {})
            cells += [fmt(values.get("auc")), fmt(values.get("tpr_at_0.01")), fmt(values.get("tpr_at_0.001"))]
        table.add_row(site_id, *cells)
    return table


def print_summary(console: Console, summary: Mapping[str, Any], title: str) -> None:
    """The run's final tables: the summary, the decision threshold (binary tasks) and the privacy audit (if any)."""
    console.print(folded(summary_table(summary, title)))
    if summary.get("stopped"):  # early stopping, or every hospital at its privacy cap
        console.print(f"stopped after round {summary.get('rounds')} of {summary.get('planned_rounds')}: "
                      f"{summary['stopped']}", highlight=False, markup=False)
    for table in (operating_point_table(summary), audit_table(summary)):
        if table is not None:
            console.print(folded(table))


def summary_table(summary: Mapping[str, Any], title: str) -> Table:
    """The final table: best-validation and final rounds, per-site validation, timings."""
    table = Table(title=title, show_lines=False)
    table.add_column("")
    table.add_column("round", justify="right")
    for name in ("val AUC", "val acc", "test AUC", "test acc"):
        table.add_column(name, justify="right")
    for label in ("best", "final"):
        entry = summary.get(label) or {}
        val, test = entry.get("val") or {}, entry.get("test") or {}
        table.add_row(
            f"{label} (by val AUC)" if label == "best" else label,
            fmt(entry.get("round")),
            fmt(val.get("auc")),
            fmt(val.get("acc")),
            fmt(test.get("auc")),
            fmt(test.get("acc")),
        )
    for label, key in (("personalised (by val AUC)", "personalized"), ("fine-tuned (last round)", "finetuned"),
                       ("global+personal ensemble", "ensemble")):
        entry = summary.get(key)
        if entry:  # each hospital's own model: validation weighted over sites, test the mean over hospitals
            val, test = entry.get("val") or {}, entry.get("test") or {}
            table.add_row(label, fmt(entry.get("round")), fmt(val.get("auc")), fmt(val.get("acc")),
                          fmt((test.get("auc") or {}).get("mean")), fmt((test.get("acc") or {}).get("mean")))
    table.add_section()
    for site_id, site in sorted((summary.get("sites") or {}).items()):
        val, test = site.get("val") or {}, site.get("test") or {}
        table.add_row(
            f"{site_id} (n={fmt(site.get('n_train'))}/{fmt(site.get('n_val'))})",
            fmt(site.get("best_round")),
            fmt(val.get("auc")),
            fmt(val.get("acc")),
            fmt(test.get("auc")),
            fmt(test.get("acc")),
        )
    privacy = summary.get("privacy")
    table.caption = (
        f"wall {fmt(summary.get('wall_s'), 1)} s, compute {fmt(summary.get('compute_s'), 1)} s, "
        f"overhead x{fmt(summary.get('overhead'), 2)}; site rows: n=train/val images, round = its best round"
        + (
            f"; privacy: max epsilon {fmt(privacy.get('max_epsilon'), 2)} at delta {privacy.get('delta'):g} "
            "(cumulative per hospital)"
            if privacy
            else ""
        )
        + _assumptions((privacy or {}).get("assumptions"))
    )
    return table


def _assumptions(assumed: Mapping[str, Any] | None) -> str:
    """Distributed DP: what every epsilon above rests on, in one clause."""
    if not assumed:
        return ""
    return (f"; distributed DP: noise multiplier {fmt(assumed.get('noise_multiplier'), 3)} in the SecAgg+ sum of "
            f"{assumed.get('hospitals')} hospitals, shares sized for <= {assumed.get('max_dropouts')} missing and "
            f"<= {assumed.get('max_colluding')} colluding")
