"""Benchmark: a deployment under load (issue 27). One coordinator and HOSPITALS hospital daemons on this machine
(tiny synthetic sites, one thread each), ROUNDS rounds of DP training, hospitals killed (SIGKILL) and started again
at seeded-random moments and the coordinator stopped by its PID and started again once (it resumes the run by
itself). The scenario and its checks are tests/load_scenario.py, the same as the e2e test (tests/e2e/test_load.py,
a smaller plan that fits CI).

Prints a table: rounds completed, hospitals per round, the faults, wall time (set-up, run, each round), the
coordinator's memory (SuperLink and ServerApp peak RSS per round, first against last), where the CPU went (by
process role, per message a hospital answered), whether every check passed, and the exact command.

    python benchmarks/load.py                  # the issue's plan: 20 hospitals, 10 rounds (35-50 min on 2 cores)
    python benchmarks/load.py --hospitals 4 --rounds 8 --min-hospitals 2 --kills 2 --round-timeout 50 \\
        --kill-window 12 --coordinator-crash   # the e2e test's plan (~5 min)

Every process is stopped by PID at the end; the work folder (a temporary one unless --work) keeps the logs, the run
directory and the site folders (audit logs, ledgers). ``--json PATH`` also writes the figures as JSON. Exits with 1
when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.load_scenario import LoadPlan, LoadResult, check, describe, rss_growth, run_load  # noqa: E402


def _args() -> argparse.Namespace:
    defaults = LoadPlan()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=defaults.hospitals)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--min-hospitals", type=int, default=defaults.min_hospitals,
                        help="strategy.min_train_nodes and min_available_nodes")
    parser.add_argument("--kills", type=int, default=defaults.hospital_kills, help="hospital kills")
    parser.add_argument("--coordinator-restarts", type=int, choices=(0, 1), default=defaults.coordinator_restarts)
    parser.add_argument("--coordinator-crash", action="store_true",
                        help="crash the coordinator (SIGKILL to its session) instead of stopping it with SIGTERM")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--round-timeout", type=float, default=defaults.round_timeout_s,
                        help="strategy.round_timeout_s")
    parser.add_argument("--kill-window", type=float, default=defaults.kill_window_s,
                        help="a kill comes at most this many seconds after its round began")
    parser.add_argument("--images", type=int, default=defaults.images, help="images per hospital")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--no-dp", action="store_true", help="train without DP (no ledgers to check)")
    parser.add_argument("--deadline", type=float, default=defaults.deadline_s, help="seconds from launch")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def report(result: LoadResult, wall_s: float, command: str) -> tuple[str, dict[str, Any]]:
    """The tables and the figures behind them."""
    plan, findings = result.plan, check(result)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (result.run_dir / "metrics.jsonl").is_file() else []
    kills = [e for e in result.events if e.kind == "hospital"]
    restarts = [e for e in result.events if e.kind == "coordinator"]
    growth = rss_growth(result)
    peaks = {s["round"]: s for s in result.rss}  # a re-run round: the resumed run's
    ends = [result.round_end_s.get(r) for r in range(1, plan.rounds + 1)]
    walls = [b - a for a, b in zip([0.0, *ends], ends) if a is not None and b is not None]
    cpu_run = {k: v - result.cpu_setup.get(k, 0.0) for k, v in result.cpu.items()}
    messages = max(result.messages, 1)
    figures = {
        "plan": {k: getattr(plan, k) for k in ("hospitals", "rounds", "min_hospitals", "hospital_kills",
                                               "coordinator_restarts", "coordinator_crash", "seed", "round_timeout_s",
                                               "dp")},
        "rounds_completed": len(lines), "trained_per_round": findings.trained_per_round,
        "hospital_kills": len(kills), "hospital_restarts": sum(1 for e in kills if e.restarted_at_s is not None),
        "coordinator_restarts": len(restarts), "coordinator_down_s": result.coordinator_down_s,
        "coordinator_steps_s": result.coordinator_steps_s,
        "wall_s": wall_s, "setup_s": result.setup_s, "run_s": result.run_s, "round_s": walls,
        "rss_peak_mib": result.rss, "rss_growth_mib": growth, "cpu_s": result.cpu, "cpu_setup_s": result.cpu_setup,
        "messages": result.messages, "problems": findings.problems,
        "replies": {"recorded": findings.replies_recorded, "dropped": findings.replies_dropped,
                    "superseded": findings.replies_superseded, "charged_unsent": findings.charged_unsent},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": command,
    }
    out = [f"Deployment under load: {plan.hospitals} hospitals (minimum {plan.min_hospitals} per round), "
           f"{plan.rounds} rounds, {'DP' if plan.dp else 'no DP'}, strategy.round_timeout_s={plan.round_timeout_s:g}; "
           f"{platform.machine()}, {os.cpu_count()} cores.", ""]
    summary = [
        ["rounds completed", f"{len(lines)} of {plan.rounds}"],
        ["hospitals trained per round", " ".join(str(findings.trained_per_round.get(r, 0))
                                                 for r in range(1, plan.rounds + 1))
         + f" (min {min(findings.trained_per_round.values(), default=0)}, required {plan.min_hospitals})"],
        ["hospital kills / restarts", f"{len(kills)} / {figures['hospital_restarts']}"],
        ["coordinator restarts", f"{len(restarts)} ({'crash' if plan.coordinator_crash else 'SIGTERM'}, down "
                                 f"{result.coordinator_down_s:.1f} s: "
                                 + ", ".join(f"{k} {v:.1f} s" for k, v in result.coordinator_steps_s.items())
                                 + ")"],
        ["wall time", f"{wall_s:.0f} s (set-up {result.setup_s:.0f} s, launch to summary {result.run_s:.0f} s)"],
        ["round wall s", " ".join(f"{w:.0f}" for w in walls)
         + (f" (median {statistics.median(walls):.0f})" if walls else "")],
        ["train replies", f"{findings.replies_recorded} recorded, {findings.replies_dropped} audited but dropped "
                          f"(late or lost in a kill), {findings.replies_superseded} cut off by the coordinator "
                          f"restart, {findings.charged_unsent} charged and never sent"],
    ]
    for proc in ("superlink", "serverapp"):
        first = next((peaks[r].get(proc) for r in sorted(peaks) if peaks[r].get(proc)), None)
        last = next((peaks[r].get(proc) for r in sorted(peaks, reverse=True) if peaks[r].get(proc)), None)
        per_life = "; ".join(f"life {k.rsplit('-', 1)[1]}: round {g['early_round']} {g['early']:.1f} -> round "
                             f"{g['late_round']} {g['late']:.1f}" for k, g in growth.items()
                             if k.startswith(proc) and not k.endswith("-run"))
        summary.append([f"{proc} peak RSS MiB first / last round",
                        f"{first or 0:.1f} / {last or 0:.1f}" + (f" ({per_life})" if per_life else "")])
    summary.append(["checks", "all passed" if not findings.problems else f"{len(findings.problems)} FAILED"])
    out += [_table(summary, ["figure", "value"]), "", "Faults:", describe(result), ""]
    rows = []
    for role in sorted(result.cpu, key=lambda r: -result.cpu[r]):
        rows.append([role, f"{result.cpu_setup.get(role, 0.0):.0f}", f"{cpu_run.get(role, 0.0):.0f}",
                     f"{cpu_run.get(role, 0.0) / messages:.2f}"])
    total_run = sum(cpu_run.values())
    rows.append(["total", f"{sum(result.cpu_setup.values()):.0f}", f"{total_run:.0f}", f"{total_run / messages:.2f}"])
    out += [f"Where the CPU went ({result.messages} messages answered; {os.cpu_count()} cores x "
            f"{result.run_s:.0f} s = {(os.cpu_count() or 1) * result.run_s:.0f} CPU s available during the run):", "",
            _table(rows, ["process role", "CPU s set-up", "CPU s run", "CPU s run per message"]), ""]
    if findings.problems:
        out += ["Problems:", *(f"  {p}" for p in findings.problems), ""]
    out += ["Command:", f"    {command}"]
    return "\n".join(out), figures


def main() -> None:
    args = _args()
    plan = LoadPlan(hospitals=args.hospitals, rounds=args.rounds, min_hospitals=args.min_hospitals,
                    hospital_kills=args.kills, coordinator_restarts=args.coordinator_restarts,
                    coordinator_crash=args.coordinator_crash, seed=args.seed,
                    round_timeout_s=args.round_timeout, kill_window_s=args.kill_window, images=args.images,
                    image_size=args.image_size, dp=not args.no_dp, deadline_s=args.deadline)
    command = shlex.join(["python", "benchmarks/load.py", *sys.argv[1:]])
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="medfed-load-"))
    started = time.monotonic()
    print(f"work folder {work}", flush=True)
    result = run_load(work / "load", plan, progress=lambda line: print(f"[{time.monotonic() - started:6.0f} s] "
                                                                       f"{line}", flush=True))
    text, figures = report(result, time.monotonic() - started, command)
    print("\n" + text)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    sys.exit(1 if figures["problems"] else 0)


if __name__ == "__main__":
    main()
