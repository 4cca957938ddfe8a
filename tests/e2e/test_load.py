"""A deployment under load (issue 27): a real coordinator and hospital daemons over TLS on this machine, a DP run
during which hospitals are killed (SIGKILL to their sessions) and started again at seeded-random moments and the
coordinator crashes (SIGKILL to its session: SuperLink, SuperExec, ServerApp) and is started again (it resumes the run
by itself from its checkpoint; this replaced test_deployment's coordinator-restart test, which checked the same with 2
hospitals and 3 rounds). Every round must complete with
its minimum of hospitals, every hospital's audit log and privacy ledger must agree with what the coordinator
recorded, nothing may be lost, and the coordinator's memory must stay flat.

The issue's scenario is 20 hospitals and 10 rounds; `python benchmarks/load.py` runs it (~35-50 min here). On CI's 2
cores every message a hospital answers is a ClientApp process of ~6-7 CPU seconds (imports: torch 1.1 s, Opacus
1.5 s, Flower and medfed; the memory preflight 0.65 s; the DP accountant), a round of 20 takes ~140 s, and a
hospital killed after it pulled its message holds its round for the whole strategy.round_timeout_s. This test runs
4 hospitals (minimum 2) through 6 rounds with two hospital kills and one coordinator crash early in round 4,
so each coordinator life records 3 rounds (its memory is compared within each life and across the two): about
4 minutes on 2 idle cores (8 rounds took 4.2-5, 10 took 6; CI's whole run has a 45-minute budget). Marked ``slow``; `make test` (``pytest -q tests``) runs it, ``-m "not slow"``
leaves it out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.load_scenario import LoadPlan, check, describe, rss_growth, run_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN = LoadPlan(hospitals=4, rounds=6, min_hospitals=2, hospital_kills=2, coordinator_restarts=1, seed=27,
                # the coordinator crashes (SIGKILL to its session); benchmarks/load.py stops it with SIGTERM
                coordinator_crash=True,
                # A round of 4 hospitals takes 19-28 s here, the first after the coordinator restart ~35 s (the
                # ServerApp starts, the SuperNodes reconnect with back-off: at 32 s its live hospitals' replies came
                # too late and it completed below its minimum). A hospital killed after it pulled its message holds
                # its round this long (or until Flower marks it unavailable: two missed 30 s heartbeats).
                round_timeout_s=50.0, kill_window_s=12.0, downtime_s=(1.0, 8.0), deadline_s=720.0)
# The coordinator's memory: each process's peak RSS in its last round may exceed its peak in its second round (the
# first after start-up) by at most this much (MiB) or 5 %, whichever is more; likewise the last life's against the
# first's. Measured here: the SuperLink's round peaks wander within 154-169 MiB with no trend (they fall as often
# as they rise), the ServerApp's within 447-448 MiB, and the run's last round peaks ~11 MiB higher (458 MiB) with
# the run's end. A leak of more than ~4 MiB per round shows within a coordinator life of 5 rounds; with the 3 rounds
# of each life here, one of more than ~8 MiB per round (and ~4 MiB per round across the run's 6, first life to last).
RSS_MARGIN_MIB = 16.0


@pytest.mark.timeout(900)  # the run's own deadline is 720 s; set-up and the checks come on top
def test_a_deployment_under_load_completes_every_round_and_agrees_with_every_hospital(tmp_path: Path) -> None:
    # Execute: the whole scenario (set-up included), every process stopped by its PID afterwards
    started = time.monotonic()
    result = run_load(tmp_path / "load", PLAN, progress=print)
    wall = time.monotonic() - started
    print(f"load test: {wall:.0f} s wall (set-up {result.setup_s:.0f} s, run {result.run_s:.0f} s, coordinator "
          f"down {result.coordinator_down_s:.0f} s); faults:\n{describe(result)}")

    # Assert: every round recorded once with its minimum of hospitals, the audit logs and ledgers agree with it,
    # the outputs are all there (check() names each disagreement)
    findings = check(result)
    assert not findings.problems, "\n".join(findings.problems) + f"\nfaults:\n{describe(result)}"
    assert sorted(findings.trained_per_round) == list(range(1, PLAN.rounds + 1))
    # the faults happened: every planned kill (each hospital started again), one coordinator restart
    kills = [e for e in result.events if e.kind == "hospital"]
    assert len(kills) == PLAN.hospital_kills, describe(result)
    assert all(e.restarted_at_s is not None for e in kills), describe(result)
    assert [e.kind for e in result.events].count("coordinator") == 1
    # each hospital killed mid-round is in that round's line: trained (its reply left before the kill) or dropped
    # with the reason (the round went on without it); with the restarts above this replaced test_deployment's
    # killed-mid-round test
    lines = {line["round"]: line for line in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())}
    for kill in kills:
        line = lines[kill.round]
        trained = line["sites"].get(kill.victim, {}).get("trained")
        dropped = [d for d in line["dropped"] if d["site"] == kill.victim and d["reason"]]
        assert trained or dropped, (kill, sorted(line["sites"]), line["dropped"])
    # each hospital sent every reply the coordinator recorded; what it sent and the coordinator did not record was
    # cut off by the coordinator restart or named in that round's dropped list (check() fails on anything else)
    assert findings.replies_recorded == sum(findings.trained_per_round.values())
    # the coordinator's memory stayed flat within each of its lives and across the restart
    growth = rss_growth(result)
    assert {"superlink-run", "serverapp-run"} <= set(growth), (growth, result.rss)
    for name, g in growth.items():
        assert g["late"] <= g["early"] + max(RSS_MARGIN_MIB, 0.05 * g["early"]), (name, g, result.rss)
