"""Real Flower simulations under privacy=distributed_dp (issue 20): integer sums with Skellam noise shares through
Flower's SecAgg+, one noised SGD step per round, each hospital's ledger charged; a round with more hospitals missing
than privacy.max_dropouts is discarded, never applied with too little noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from medfed.client.ledger import SKELLAM, LedgerEntry
from medfed.common.models.weights import load_checkpoint

from tests.e2e.test_simulation import FAST_DP, _assert_run_outputs, _medfed

pytestmark = pytest.mark.e2e

DDP = ["--cache-dir", "cache", *FAST_DP, "privacy=distributed_dp", "privacy.target_epsilon=4", "train.rounds=2"]


def _ledgers(state: object) -> dict[str, list[LedgerEntry]]:
    out = {}
    for path in sorted(state.glob("privacy/*.json")):  # type: ignore[attr-defined]
        out[path.stem] = [LedgerEntry(**e) for e in json.loads(path.read_text())["entries"]]
    return out


def test_a_distributed_dp_run_steps_with_the_noised_sum_and_reports_epsilon_and_its_assumptions(tmp_path):
    # Execute
    result = _medfed(["simulate", "--run-dir", "run", "--state-dir", "state", *DDP], tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "run", 2, metered=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assumptions = summary["privacy"]["assumptions"]
    assert {k: assumptions[k] for k in ("hospitals", "max_dropouts", "max_colluding", "sample_rate")} == \
        {"hospitals": 3, "max_dropouts": 0, "max_colluding": 0, "sample_rate": 1.0}
    assert assumptions["noise_multiplier"] > 0 and "SecAgg+" in assumptions["mechanism"]
    assert all(line["privacy"]["assumptions"] == assumptions for line in lines)
    for site in ("hospital-0", "hospital-1", "hospital-2"):
        eps = [line["sites"][site]["epsilon"] for line in lines]
        assert 0 < eps[0] < eps[1] <= 4.0
        assert [line["sites"][site]["integer_overflow"] for line in lines] == [0, 0]
    assert not any(line["dropped"] for line in lines)
    # each hospital's ledger: two Skellam rounds at the plan's noise, beside its Gaussian releases
    ledgers = _ledgers(tmp_path / "state")
    assert len(ledgers) == 3
    for entries in ledgers.values():
        rounds = [e for e in entries if e.mechanism == SKELLAM]
        assert [(e.server_round, e.kind, e.steps) for e in rounds] == [(1, "train", 1), (2, "train", 1)]
        assert {e.noise_multiplier for e in rounds} == {assumptions["noise_multiplier"]}
        assert {e.kind for e in entries if e.mechanism != SKELLAM} == {"evaluate", "count", "calibrate", "reliability"}
    # the global model moved, and learned (synthetic data, 3 x ~160 training images, epsilon 4)
    first, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-1.pt") \
        if (tmp_path / "run" / "checkpoints" / "round-1.pt").exists() else (None, None)
    final, _ = load_checkpoint(tmp_path / "run" / "model.pt")
    if first is not None:
        assert any(not np.array_equal(first[k], final[k]) for k in final)
    assert summary["best"]["test"]["auc"] >= 0.8, summary["best"]["test"]
    assert "eps 0:" in result.stdout


@pytest.mark.parametrize("max_dropouts", [0, 1])
def test_more_hospitals_missing_than_max_dropouts_discards_the_round(tmp_path, max_dropouts):
    # Prepare: hospital-2's cap affords nothing, so it refuses every round (it is missing from every sum)
    args = ["simulate", "--run-dir", "run", "--state-dir", "state", *DDP, f"privacy.max_dropouts={max_dropouts}",
            "federation.site_max_epsilon_each=[8,8,0.5]"]

    # Execute
    result = _medfed(args, tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        refused = [d for d in line["dropped"] if d["phase"] == "train"]
        assert len(refused) == 1 and "Privacy cap reached" in refused[0]["reason"]
        discarded = [d for d in line["dropped"] if d["phase"] == "aggregate"]
        assert len(discarded) == (1 if max_dropouts == 0 else 0)
        if discarded:
            assert "more than privacy.max_dropouts=0" in discarded[0]["reason"]
    initial_auc = None
    final, _ = load_checkpoint(tmp_path / "run" / "model.pt")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if max_dropouts == 0:  # every round discarded: the global model is still the seeded initial one
        assert summary["final"]["test"]["auc"] == pytest.approx(lines[0]["test"]["auc"])
    else:  # applied with the two hospitals left: it learned
        assert summary["best"]["test"]["auc"] >= 0.8, summary["best"]["test"]
    del initial_auc, final
