"""`medfed demo` (what `make demo` runs): offline, on the BreastMNIST file shipped inside medfed, it prints the
local-only, federated and federated + DP rows with their test AUCs.

The demo runs as a `medfed` process in its own session (killed by its PID in `finally`) with a home directory of its
own and no data path, so it can only read the shipped file. Every Python process of the run (the demo and Ray's
workers, which host the simulated hospitals) loads a `sitecustomize` that records each name it resolves and each
connection it opens outside this machine: the test fails on any.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

# Loaded by every Python process of the run (PYTHONPATH); never raises, only records.
NETWORK_RECORDER = '''
import ipaddress, os, socket, sys

_LOG = os.environ["MEDFED_TEST_NETWORK_LOG"]
_LOCAL_NAMES = {"", "localhost", socket.gethostname()}


def _record(line):
    with open(_LOG, "a", encoding="utf-8") as handle:
        handle.write(line + "\\n")


def _local(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name that needs a DNS lookup
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def _hook(event, args):
    try:
        if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex") and args[0] is not None:
            if not _local(args[0]):
                _record(f"{os.getpid()} {event} {args[0]!r}")
        elif event == "socket.connect" and isinstance(args[1], tuple) and args[0].type == socket.SOCK_STREAM:
            if not _local(args[1][0]):
                _record(f"{os.getpid()} {event} {args[1]!r}")
        elif event in ("urllib.Request", "http.client.connect"):
            _record(f"{os.getpid()} {event} {args[0]!r}")
    except Exception as exc:  # a recorder that fails must say so, never break the process
        _record(f"{os.getpid()} recorder failed on {event}: {exc!r}")


sys.addaudithook(_hook)
with open(os.environ["MEDFED_TEST_NETWORK_LOG"] + ".processes", "a", encoding="utf-8") as _handle:
    _handle.write(f"{os.getpid()} {' '.join(sys.argv)[:200]}\\n")
'''

# A row of the table: its label, then the cells; test AUC is the first number with three decimals after the recipe.
ROW = r"^\W*{label}\W.*?\s(\d\.\d{{3}})(?: \(\d\.\d\d-\d\.\d\d\))?\s*\W\s*(\d\.\d{{3}})\s"


def _rays_cloud_probe(attempt: str, processes: dict[str, str]) -> bool:
    """Ray's dashboard process asks the cloud metadata service which cloud it runs on (ray._common.usage.usage_lib:
    get_cloud_from_metadata_requests, called by its UsageStatsHead even with RAY_USAGE_STATS_ENABLED=0): the
    link-local 169.254.169.254 and the name metadata.google.internal, with 1 s timeouts. It sends nothing of the
    run, fails at once offline, and happens in every simulation, so the test allows exactly that."""
    pid, _, target = attempt.partition(" ")
    return ("ray/dashboard/dashboard.py" in processes.get(pid, "")
            and ("'169.254.169.254'" in target or "'metadata.google.internal'" in target))


def test_demo_runs_offline_on_the_shipped_breastmnist_and_prints_every_row(tmp_path):
    # Prepare: no data path, an empty home (no cache, no ~/.medmnist), nothing of ../shared on any path
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(NETWORK_RECORDER, encoding="utf-8")
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MEDFED_DATA_DIR", "PYTHONPATH")}
    env.update(
        HOME=str(tmp_path / "home"), FLWR_HOME=str(tmp_path / "flwr-home"), MEDFED_STATE_DIR=str(tmp_path / "state"),
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0", COLUMNS="200",
        PYTHONPATH=os.pathsep.join([str(recorder), str(REPO_ROOT)]), MEDFED_TEST_NETWORK_LOG=str(log),
    )
    run_dir = tmp_path / "demo"

    # Execute: the demo as `make demo` runs it, 2 rounds of 1 local epoch (every row keeps its model and federation)
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli.main", "demo", "--run-dir", str(run_dir), "train.rounds=2",
         "train.local_epochs=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=540)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # by PID: the session we started, never by name
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    # Assert: it ran on the shipped file, offline
    assert proc.returncode == 0, out[-4000:]
    shipped = REPO_ROOT / "common" / "data" / "demo"
    assert f"shipped with medfed, MedMNIST v2, CC BY 4.0; {shipped / 'breastmnist.npz'}" in out
    processes = dict(line.split(" ", 1) for line in (tmp_path / "network.log.processes").read_text().splitlines())
    assert any("default_worker.py" in argv for argv in processes.values()), processes  # inside the hospitals too
    attempts = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    assert [a for a in attempts if not _rays_cloud_probe(a, processes)] == []

    # Assert: one table with the three rows and their numbers, the same as demo.json
    summary = json.loads((run_dir / "demo.json").read_text(encoding="utf-8"))
    assert summary["data"] == str(shipped)
    rows = {row["key"]: row for row in summary["rows"]}
    assert list(rows) == ["local", "fedavg", "dp"]
    for key, label in (("local", "local-only"), ("fedavg", r"federated \(FedAvg\)"), ("dp", r"federated \+ DP")):
        match = re.search(ROW.format(label=label), out, flags=re.MULTILINE)
        assert match is not None, (label, out[-3000:])
        auc, acc = float(match.group(1)), float(match.group(2))
        assert 0.0 <= auc <= 1.0 and 0.0 <= acc <= 1.0
        assert math.isclose(auc, rows[key]["test_auc"], abs_tol=5e-4)
        assert math.isclose(acc, rows[key]["test_acc"], abs_tol=5e-4)
        assert (run_dir / key / "summary.json").is_file()
    assert rows["local"]["test_auc_range"][0] <= rows["local"]["test_auc"] <= rows["local"]["test_auc_range"][1]
    assert 0 < rows["dp"]["epsilon"] <= 8.0
    assert f"medfed report {run_dir / 'fedavg'}" in out
    assert "medfed coordinator console" in out and "medfed hospital console --config site.yaml" in out
