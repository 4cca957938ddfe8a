"""The privacy ledger under concurrency, with real processes: two runs planning against one site's ledger never
both pass a cap only one fits under, and no recorded entry is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medfed.client.ledger import LedgerEntry
from medfed.client.privacy import epsilon_spent

# a worker: plan and record one DP round of `run` against the ledger in STATE, as the ClientApp does; planning is
# slowed so that, without the ledger's lock, both processes would read the empty ledger before either records.
# Workers say "ready" once imported and start when the file GO exists.
_PLAN_ONE_ROUND = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import medfed.client.dp_round as dp_round
    from medfed.client.node import NodeEnv
    from medfed.common import keys
    from medfed.common.config import compose_config
    from medfed.common.data import ArrayDataset, DatasetInfo, SiteData
    from medfed.common.errors import PrivacyBudgetExceeded

    state_dir, run_id, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real = dp_round.plan_round
    def slow_plan(*args, **kwargs):
        plan = real(*args, **kwargs)
        time.sleep(1.0)
        return plan
    dp_round.plan_round = slow_plan

    class State:
        def __init__(self): self.raw, self.keys = None, []
        def ledger_entries(self): return self.raw
        def set_ledger_entries(self, raw): self.raw = raw
        def kept_layers(self): return None
        def set_kept_layers(self, kept): pass
        def answered(self): return self.keys
        def set_answered(self, answered): self.keys = answered

    cfg = compose_config(["privacy=dp", "privacy.target_epsilon=2.5", "train.rounds=1", "train.batch_size=16",
                          "federation.site_max_epsilon=3"])
    data = ArrayDataset(np.zeros((64, 1, 8, 8), np.float32), np.arange(64) % 2)
    site = SiteData("hospital-0", train=data, val=data, info=DatasetInfo("synthetic", 2, 1, 2, 8, ("0", "1")))
    env = NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {keys.RUN_STATE_DIR: state_dir})
    print("ready", flush=True)
    while not os.path.exists(go):  # both processes start planning at the same moment
        time.sleep(0.01)
    try:
        private = dp_round.start_private_round(cfg, cfg.privacy, site, env, State(), run_id=run_id, server_round=1)
        print("planned", private.plan.epsilon_after)
    except PrivacyBudgetExceeded:
        print("refused")
""")

_RECORD_MANY = textwrap.dedent("""
    import sys
    from medfed.client.ledger import LedgerEntry, PrivacyLedger
    ledger = PrivacyLedger(sys.argv[1], "site")
    for i in range(int(sys.argv[3])):
        ledger.record([LedgerEntry.new(int(sys.argv[2]), i + 1, 1.0, 0.1, 1)])
""")


def _run_two(code: str, *args_per_process: list[str], go: Path | None = None) -> list[str]:
    """Run the workers; with ``go``, create that file once every worker printed "ready"."""
    processes = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for args in args_per_process]
    if go is not None:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        go.touch()
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def _entries(state_dir: Path) -> list[LedgerEntry]:
    (ledger,) = (state_dir / "privacy").glob("*.json")
    return [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]


def test_two_runs_at_once_never_both_pass_the_cap(tmp_path):
    # Prepare: a cap of 3 and two runs whose one round costs 2.5 each
    go = tmp_path / "go"

    # Execute: both plan at the same moment against one ledger
    outputs = _run_two(_PLAN_ONE_ROUND, [str(tmp_path), "1", str(go)], [str(tmp_path), "2", str(go)], go=go)

    # Assert: the second saw the first's entry (it planned more noise to fit, or was refused), so the ledger holds
    # exactly what was planned and its epsilon is within the cap (without the lock both plan 2.5: 3.8 in all)
    planned = [float(o.split()[1]) for o in outputs if o.startswith("planned")]
    entries = _entries(tmp_path)
    assert len(entries) == len(planned) >= 1, outputs
    assert epsilon_spent(entries, 1e-5) <= 3.0
    assert max(planned) == pytest.approx(epsilon_spent(entries, 1e-5), rel=1e-6)


def test_no_entry_is_lost_when_two_processes_record_at_once(tmp_path):
    _run_two(_RECORD_MANY, [str(tmp_path), "1", "100"], [str(tmp_path), "2", "100"])
    assert len(_entries(tmp_path)) == 200
