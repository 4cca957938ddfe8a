"""A real Flower simulation with sample-level DP: cumulative epsilon everywhere, a hospital at its cap sits out."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_simulation import FAST, _assert_run_outputs, _medfed

pytestmark = pytest.mark.e2e


def test_dp_simulation_reports_cumulative_epsilon_and_a_capped_site_sits_out(tmp_path):
    # Prepare: hospital-0 allows almost nothing, the others accept the run's target
    args = ["simulate", "--run-dir", "run", "--cache-dir", "cache", "--state-dir", "state", *FAST,
            "train.rounds=3", "privacy=dp", "privacy.target_epsilon=3", "federation.site_max_epsilon_each=[0.01,8,8]"]

    # Execute
    result = _medfed(args, tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "run", 3)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for site in ("hospital-1", "hospital-2"):
        eps = [line["sites"][site]["epsilon"] for line in lines]
        assert 0 < eps[0] < eps[1] < eps[2] <= 3.0  # cumulative, within the run's target
        assert summary["sites"][site]["epsilon"] == pytest.approx(eps[-1])
    assert summary["privacy"]["max_epsilon"] == pytest.approx(
        max(summary["sites"][s]["epsilon"] for s in ("hospital-1", "hospital-2"))
    )
    for line in lines:  # hospital-0 refused every round with a PHI-free reason, and the run went on
        (drop,) = [d for d in line["dropped"] if d["phase"] == "train"]
        # before its first evaluate reply the server knows hospital-0 only by its Flower node id
        assert drop["site"] == "hospital-0" or (line["round"] == 1 and drop["site"].startswith("node-"))
        assert "Privacy cap reached" in drop["reason"]
        assert str(tmp_path) not in drop["reason"]
        assert "epsilon" not in line["sites"].get("hospital-0", {})
    assert "Privacy cap reached" in result.stdout  # shown in the progress display
    assert "eps 1:" in result.stdout
    assert summary["best"]["test"]["auc"] > 0.6  # learned despite the noise (chance 0.5)
    assert len(list((tmp_path / "state" / "privacy").glob("*.json"))) == 3


def test_central_dp_simulation_reports_flowers_run_level_epsilon(tmp_path):
    # Execute
    result = _medfed(["simulate", "--run-dir", "run", "--cache-dir", "cache", *FAST, "train.rounds=2",
                      "privacy=central_dp", "privacy.noise_multiplier=0.3", "privacy.clipping_norm=5"], tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "run", 2)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [line["privacy"]["run_epsilon"] for line in lines]
    assert 0 < eps[0] < eps[1]
    assert summary["privacy"]["run_epsilon"] == pytest.approx(eps[1])
    assert summary["privacy"]["delta"] == 1e-5
