"""The final stages with real ClientApps: federated temperature scaling over three simulated hospitals, what their
replies carry (scalars only; Grad-CAM maps stay on the hospital's disk), and a hospital that fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, MessageType, RecordDict

from medfed.client.app import SiteFailure
from medfed.client.app import app as client_app
from medfed.common import keys
from medfed.common.calibration import TEMPERATURES
from medfed.common.config import ModelConfig, compose_config, run_config_from_overrides
from medfed.common.data import load_test_set
from medfed.common.metrics import ECE_BINS
from medfed.common.models import build_model
from medfed.server.final import calibrate_federated, final_nodes, uncertainty_on_test_set
from medfed.server.runs import RunDirectory
from tests.conftest import instruction, reply

BASE = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3", "model.width=8"]


class ClientAppGrid:
    """Delivers each message to a real ClientApp of simulated hospital ``node_id`` and keeps what came back."""

    def __init__(self, tmp_path, extra: list[str], failing: int | None = None) -> None:
        run_config = run_config_from_overrides(
            [*BASE, *extra], **{keys.RUN_CACHE_DIR: str(tmp_path / "cache"), keys.RUN_DIR: str(tmp_path / "run")}
        )
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={keys.NODE_PARTITION_ID: node, "num-partitions": 3},
                          state=RecordDict(), run_config=run_config)
            for node in range(3)
        }
        self.failing = failing
        self.replies = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for index, message in enumerate(messages):
            node = message.metadata.dst_node_id
            content = message.content
            if node == self.failing:  # a hospital whose evaluation breaks: weights of another model
                content = RecordDict({keys.ARRAYS: ArrayRecord({"x": torch.zeros(2)}),
                                      keys.CONFIG: message.content.config_records[keys.CONFIG]})
            sent = instruction(content, MessageType.EVALUATE, dst_node_id=node, message_id=f"m-{index}")
            try:
                replies.append(client_app(sent, self.contexts[node]))
            except SiteFailure as exc:  # Flower's runtime turns the exception into an error reply
                replies.append(reply(None, src_node_id=node, message_type=MessageType.EVALUATE,
                                     error=Error(code=0, reason=str(exc))))
        self.replies += replies
        return replies


def _trained_state(tmp_path) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn", width=8), spatial_dims=2, in_channels=1, n_classes=2)
    with torch.no_grad():  # an over-confident model: the head's logits 6 x too large
        model.head.weight.normal_(0.0, 1.0)
        model.head.weight.mul_(6.0)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_hospitals_fit_one_temperature_and_keep_their_gradcam_maps(tmp_path, task_identity):
    # Prepare: three real hospitals (synthetic task), Grad-CAM maps of 4 validation images each
    grid = ClientAppGrid(tmp_path, ["evaluate.gradcam_samples=4"])

    # Execute
    result = calibrate_federated(grid, _trained_state(tmp_path), timeout=None)

    # Assert: one temperature from everyone's sums; ECE per site and pooled, before and after
    assert result["temperature"] in TEMPERATURES and result["dropped"] == []
    assert result["sites_fitted"] == ["hospital-0", "hospital-1", "hospital-2"]
    assert result["val"]["nll_after"] <= result["val"]["nll_before"]
    assert result["temperature"] > 1.0  # the over-confident model is softened
    assert result["val"]["ece_after"] < result["val"]["ece_before"]  # and better calibrated on validation
    assert sorted(result["sites"]) == result["sites_fitted"]
    assert sum(s["n_val"] for s in result["sites"].values()) == result["val"]["n"]
    assert len(result["reliability"]["val_after"]) == ECE_BINS
    # replies: scalars and short lists only (the NLL grid, 3 x bins reliability sums), never weights or maps
    for sent in grid.replies:
        assert not sent.content.array_records
        for value in sent.content[keys.METRICS].values():
            assert not isinstance(value, list) or len(value) in (len(TEMPERATURES), 3 * ECE_BINS)
        assert set(sent.content.config_records) == {keys.SITE}
    assert result["gradcam_saved"] == {f"hospital-{i}": 4 for i in range(3)}
    for site in range(3):  # the maps are on the (simulated) hospital's disk
        folder = tmp_path / "run" / "sites" / f"hospital-{site}" / "gradcam"
        assert len(list(folder.glob("val-*.png"))) == 4 and len(list(folder.glob("val-*.npy"))) == 4


def test_a_failing_hospital_is_left_out_with_its_reason(tmp_path, task_identity):
    grid = ClientAppGrid(tmp_path, [], failing=1)

    result = calibrate_federated(grid, _trained_state(tmp_path), timeout=None)

    assert result["sites_fitted"] == ["hospital-0", "hospital-2"]
    assert [d["node"] for d in result["dropped"]] == ["1", "1"]  # both stages
    assert "IncompatibleUpdateError" in result["dropped"][0]["reason"]


def test_the_final_stages_ask_a_rounds_share_of_the_hospitals(tmp_path, task_identity):
    # Prepare: a stand-in for a large federation's grid
    class Many:
        def get_node_ids(self):
            return list(range(1000, 0, -1))

    # Execute / Assert: every hospital by default; with fraction_evaluate < 1, Flower's count (at least the minimum),
    # the same draw for the same seed (both calibration stages ask the same hospitals), another for another seed
    assert final_nodes(Many(), 1.0, 2, seed=0) == list(range(1, 1001))
    sample = final_nodes(Many(), 0.01, 2, seed=0)
    assert len(sample) == 10 and sample == sorted(sample) and set(sample) <= set(range(1, 1001))
    assert final_nodes(Many(), 0.01, 2, seed=0) == sample != final_nodes(Many(), 0.01, 2, seed=1)
    assert len(final_nodes(Many(), 0.001, 25, seed=0)) == 25
    # and calibration asks only the nodes it is given: hospital 1 is not asked, so it is neither fitted nor dropped
    grid = ClientAppGrid(tmp_path, [])
    result = calibrate_federated(grid, _trained_state(tmp_path), timeout=None, node_ids=[0, 2])
    assert result["sites_fitted"] == ["hospital-0", "hospital-2"] and result["dropped"] == []
    assert {m.metadata.src_node_id for m in grid.replies} == {0, 2}


def test_calibration_is_skipped_when_no_hospital_answers(tmp_path, task_identity):
    class Silent(ClientAppGrid):
        def send_and_receive(self, messages, *, timeout=None):
            list(messages)
            return []

    result = calibrate_federated(Silent(tmp_path, []), _trained_state(tmp_path), timeout=0.1)

    assert result["temperature"] is None and "no hospital" in result["skipped"]
    assert len(result["dropped"]) == 3


def test_the_coordinator_compares_the_model_its_calibration_mc_dropout_and_snapshots(tmp_path):
    # Prepare: a run directory with two snapshot models, a model with dropout
    cfg = compose_config([*BASE, "model.dropout=0.3", "evaluate.mc_samples=4", "evaluate.snapshots=2"])
    run_dir = RunDirectory(tmp_path / "run")
    info, test_set = load_test_set(cfg, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=info.channels, n_classes=2)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for server_round in (1, 2, 3):
        run_dir.save_snapshot(server_round, {k: v + 0.01 * server_round for k, v in state.items()}, keep=2)

    # Execute
    result = uncertainty_on_test_set(cfg, model, state, test_set, run_dir, temperature=2.0, up_to_round=3)

    # Assert
    assert set(result["test"]) == {"model", "calibrated", "mc_dropout", "snapshot_ensemble"}
    assert result["snapshot_ensemble"]["members"] == [2, 3]  # only the 2 latest kept on disk
    assert result["mc_dropout"]["mean_variance"] > 0.0
    model_auc = result["test"]["model"]["metrics"]["auc"]
    assert result["test"]["calibrated"]["metrics"]["auc"] == pytest.approx(model_auc)  # T keeps the ranking
    assert [r["refer"] for r in result["test"]["model"]["referral"]][:2] == [0.0, 0.05]
    saved = np.load(run_dir.evaluation_dir / "test_predictions.npz")
    assert saved["labels"].shape[0] == saved["probs_snapshot_ensemble"].shape[0] == len(test_set)
