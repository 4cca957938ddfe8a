"""A real Flower simulation with sample-level DP: cumulative epsilon everywhere, a hospital at its cap sits out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfed.common.models.weights import load_checkpoint
from tests.e2e.test_simulation import FAST, FAST_DP, _assert_run_outputs, _medfed

pytestmark = pytest.mark.e2e


def test_dp_simulation_reports_cumulative_epsilon_and_a_capped_site_sits_out(tmp_path):
    # Prepare: hospital-0 allows almost nothing, the others accept the run's target
    args = ["simulate", "--run-dir", "run", "--cache-dir", "cache", "--state-dir", "state", *FAST_DP,
            "train.rounds=3", "privacy=dp", "privacy.target_epsilon=3", "federation.site_max_epsilon_each=[0.01,8,8]"]

    # Execute
    result = _medfed(args, tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "run", 3, metered=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:  # metered: validation metrics from noised statistics, no exact loss or count
        for site in ("hospital-1", "hospital-2"):
            record = line["sites"][site]
            assert record["val_noised"] is True and record["train_loss"] is None and record["n_train"] is None
    for site in ("hospital-1", "hospital-2"):
        eps = [line["sites"][site]["epsilon"] for line in lines]
        assert 0 < eps[0] < eps[1] < eps[2] <= 3.0  # cumulative, within the run's target
        assert summary["sites"][site]["epsilon"] == pytest.approx(eps[-1])
    assert summary["privacy"]["max_epsilon"] == pytest.approx(
        max(summary["sites"][s]["epsilon"] for s in ("hospital-1", "hospital-2"))
    )
    for line in lines:  # hospital-0 refused every round with a PHI-free reason, and the run went on
        (drop,) = [d for d in line["dropped"] if d["phase"] == "train"]
        # it never answers (its metered evaluations do not fit its cap either), so the server knows it only by
        # its Flower node id
        assert drop["site"].startswith("node-")
        assert "Privacy cap reached" in drop["reason"]
        (evaluation,) = [d for d in line["dropped"] if d["phase"] == "evaluate"]
        assert evaluation["site"] == drop["site"] and "Privacy cap reached" in evaluation["reason"]
        assert str(tmp_path) not in drop["reason"]
        assert "epsilon" not in line["sites"].get("hospital-0", {})
    assert "Privacy cap reached" in result.stdout  # shown in the progress display
    assert "eps 1:" in result.stdout
    assert summary["best"]["test"]["auc"] >= 0.80  # learned despite the noise: measured 0.8626 here (2026-12-06)
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


def test_secagg_plus_aggregates_to_the_same_weights_as_plain_fedavg(tmp_path):
    # Execute: the same federation and seed, one round, once plain and once under Flower's SecAgg+
    common = ["--cache-dir", "cache", *FAST, "train.rounds=1"]
    plain = _medfed(["simulate", "--run-dir", "plain", *common], tmp_path)
    secure = _medfed(["simulate", "--run-dir", "secure", *common, "privacy.secure_aggregation=true"], tmp_path)

    # Assert
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert secure.returncode == 0, secure.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "secure", 1)
    assert sorted(summary["sites"]) == ["hospital-0", "hospital-1", "hospital-2"]
    ours, _ = load_checkpoint(tmp_path / "secure" / "model.pt")
    reference, _ = load_checkpoint(tmp_path / "plain" / "model.pt")
    assert ours.keys() == reference.keys()
    worst = max(float(np.max(np.abs(ours[k] - reference[k]))) for k in ours)
    print("largest difference", worst)
    # SecAgg+ quantizes each hospital's weighted weights (range +-8 in 2^22 levels, ~4e-6) and its weight
    # (n / max_weight in 2^22 levels); the sum divided by the total weight is equal to FedAvg up to ~1e-4
    assert worst < 1e-4, worst
    assert any(not np.array_equal(ours[k], reference[k]) for k in ours)  # it really went through SecAgg+


def test_scatternet_under_dp_a_small_cap_site_trains_and_the_run_reports_its_threshold_and_audit(tmp_path):
    # Prepare: hospital-0's own cap (1) is far below the run's target (8); the run asks for the privacy audit
    args = ["simulate", "--run-dir", "run", "--cache-dir", "cache", "--state-dir", "state", *FAST_DP, "train.rounds=3",
            "privacy=dp", "model=scatternet", "federation.site_max_epsilon_each=[1,8,8]", "evaluate.audit=true",
            "evaluate.audit_shadows=2"]

    # Execute
    result = _medfed(args, tmp_path)

    # Assert: every hospital trained within its own cap (hospital-0 on a plan that fits 1)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _assert_run_outputs(tmp_path / "run", 3, metered=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [line["sites"].get("hospital-0", {}).get("epsilon") for line in lines]
    assert any(e is not None and e > 0 for e in trained)
    assert summary["sites"]["hospital-0"]["epsilon"] <= 1.0
    assert all(summary["sites"][s]["epsilon"] <= 8.0 for s in ("hospital-1", "hospital-2"))
    assert set(load_checkpoint(tmp_path / "run" / "model.pt")[0]) == {"head.weight", "head.bias"}  # the head only
    # the features were computed at each hospital and kept there
    assert len(list((tmp_path / "state" / "features").glob("features-*.npy"))) == 3
    # the audit: attack AUC and TPRs per hospital, scalars only, beside the note that DP does not cover them
    audit = summary["audit"]
    assert set(audit["sites"]) == {"hospital-0", "hospital-1", "hospital-2"}
    for attacks in audit["sites"].values():
        assert set(attacks) == {"loss", "lira"}
        assert all(0.0 <= v <= 1.0 for a in attacks.values() for v in a.values())
    assert "outside DP-SGD's guarantee" in audit["note"]
    assert "privacy audit" in result.stdout
    assert "DP plan: target epsilon 8" in result.stdout  # every hospital's plan, printed before round 1
    assert summary["best"]["test"]["auc"] >= 0.72  # the head learned under DP: measured 0.7806 here (2026-12-06)
