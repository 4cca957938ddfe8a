"""medfed tune end to end: real simulated trials (each a `medfed simulate` process), the best recipe written and run
again, the test split never read by the search, a DP search charged to the hospitals' ledgers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
# a small federation: 2 hospitals, 2 rounds (a trial is ~10 s here)
FEDERATION = ["dataset.n_train=240", "dataset.n_test=80", "federation.hospitals=2", "train.rounds=2"]


@contextlib.contextmanager
def _started(args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """`medfed ARGS...` in a session of its own (output and errors on one pipe); afterwards the whole session is
    killed by its PID (the trials included)."""
    env = {**os.environ, "FLWR_HOME": str(cwd / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO_ROOT),
           "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "medfed.cli.main", *args], cwd=cwd, env=env, text=True,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # by PID: the session we started (trials included)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _medfed(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    with _started(args, cwd) as proc:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_a_three_trial_tune_writes_a_recipe_that_reproduces_its_best_trial_without_reading_the_test_split(tmp_path):
    # Prepare: a space of two learning rates far apart (one learns in 2 rounds, one barely moves)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: [0.000001, 0.003]\ntrain.local_epochs: {low: 1, high: 2}\n")

    # Execute: the search, two trials at a time, then the best recipe as a normal run (which reads the test split
    # once)
    result = _medfed(["tune", *FEDERATION, "--trials", "3", "--space", str(space), "--out", "tune",
                      "--cache-dir", "cache", "--parallel", "2"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    found = json.loads((tmp_path / "tune" / "tune.json").read_text())
    again = _medfed(["simulate", "--config-file", "tune/best.yaml", "--run-dir", "again", "--cache-dir", "cache"],
                    tmp_path)

    # Assert: three trials, each a run directory whose runs never computed a test metric (the loader refuses the
    # test split under evaluate.test_split=false, so a run that tried would have failed)
    # (2-round trials are never pruned; a recipe the sampler proposes again is not run again: state "repeat")
    assert [t["number"] for t in found["trials"]] == [0, 1, 2]
    assert {t["state"] for t in found["trials"]} <= {"complete", "repeat"}, found["trials"]
    # trials 0 and 1 ran at once (each a simulation process of its own)
    first, second = found["trials"][0], found["trials"][1]
    assert "(2 at a time)" in result.stdout
    assert second["state"] == "repeat" or abs(first["started_s"] - second["started_s"]) < min(
        first["wall_s"], second["wall_s"]), found["trials"]
    for trial in (t for t in found["trials"] if t["state"] == "complete"):
        run = Path(trial["run_dir"]) if Path(trial["run_dir"]).is_absolute() else tmp_path / trial["run_dir"]
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(line["test"] is None for line in lines)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["best"]["test"] is None and "uncertainty" not in summary
        assert "evaluate.test_split=false" in json.loads((run / "overrides.json").read_text())
    best = found["best"]
    assert best["val_auc"] == max(t["val_auc"] for t in found["trials"])
    # the recipe: the federation and the best trial's values, without the test-split override
    recipe = (tmp_path / "tune" / "best.yaml").read_text()
    assert "evaluate.test_split" not in recipe and f"train.lr={best['params']['train.lr']!r}" in recipe
    # run again from the recipe: the same validation AUC at the same round, and now test metrics
    assert again.returncode == 0, again.stdout[-4000:]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["best"]["round"] == best["best_round"]
    assert summary["best"]["val"]["auc"] == pytest.approx(best["val_auc"], abs=1e-9)
    assert 0.0 <= summary["best"]["test"]["auc"] <= 1.0
    assert "best: trial" in result.stdout and "val AUC" in result.stdout


def test_a_dp_tune_asks_first_and_charges_every_trial_to_the_hospitals_ledgers(tmp_path):
    # Prepare: a DP search of two 1-round trials over the clipping norm
    space = tmp_path / "space.yaml"
    space.write_text("privacy.max_grad_norm: {low: 0.5, high: 2.0}\n")
    # (exact validation metrics: a hospital's noised AUC on a 24-image validation split is often undefined)
    args = ["tune", *FEDERATION, "train.rounds=1", "privacy=dp", "privacy.target_epsilon=2",
            "privacy.exact_metrics=true", "--trials", "2",
            "--space", str(space), "--out", "tune", "--cache-dir", "cache"]

    # Execute: without --yes and no answer, it asks and does not start; with --yes it runs
    refused = _medfed(args, tmp_path)
    assert refused.returncode != 0 and "tuning spends privacy too" in refused.stdout
    assert not (tmp_path / "tune").exists()
    result = _medfed([*args, "--yes"], tmp_path)

    # Assert: both trials ran and both are in every hospital's ledger (two runs, one training release each)
    assert result.returncode == 0, result.stdout[-4000:]
    from medfed.client.ledger import site_ledgers

    ledgers = site_ledgers(tmp_path / "tune" / "state")
    assert len(ledgers) == 2
    for ledger in ledgers:
        runs = {e.run_id for e in ledger.entries() if e.kind == "train"}
        assert len(runs) == 2, ledger.entries()
    found = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert len(found["privacy_spent"]) == 2 and all(0 < e <= 2 * 2 + 1e-9 for e in found["privacy_spent"].values())
    assert "privacy spent by the whole search" in result.stdout


def _processes_naming(text: str) -> list[int]:
    """PIDs of the processes whose command line names ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_sigterm_stops_the_running_trial_and_keeps_what_the_search_found(tmp_path):
    # Prepare: a search whose trials take several rounds
    out = tmp_path / "tune"
    args = ["tune", *FEDERATION, "train.rounds=30", "--trials", "3", "--out", str(out), "--cache-dir", "cache"]
    with _started(args, tmp_path) as proc:
        # Execute: SIGTERM to the command alone (as a service stop sends it) once its first trial has a round
        deadline = time.monotonic() + 240
        while not (out / "trial-000" / "metrics.jsonl").is_file() or not (
                out / "trial-000" / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)

    # Assert: the command says so and exits 130, the trial's simulation is gone, tune.json keeps the trial
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted after 1 trial(s)" in output
    assert _processes_naming(str(out / "trial-000")) == []
    found = json.loads((out / "tune.json").read_text())
    assert found["interrupted"] is True
    [trial] = found["trials"]
    assert trial["state"] == "interrupted" and 1 <= trial["rounds"] < 30 and found["best"] is None
