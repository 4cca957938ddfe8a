"""The ClientApp called directly with a Message and a Context, as Flower calls it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from medfed.client.app import SiteFailure, app
from medfed.common import keys
from medfed.common.config import compose_config, run_config_from_overrides
from medfed.common.models import build_model
from tests.conftest import instruction

OVERRIDES = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3"]


@pytest.fixture
def context(tmp_path):
    return Context(
        run_id=1,
        node_id=7,
        node_config={keys.NODE_PARTITION_ID: 1, "num-partitions": 3},
        state=RecordDict(),
        run_config=run_config_from_overrides(OVERRIDES, **{keys.RUN_CACHE_DIR: str(tmp_path / "cache")}),
    )


def _global_arrays() -> ArrayRecord:
    cfg = compose_config(OVERRIDES)
    return ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())


def _message(message_type: str, arrays: ArrayRecord):
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})
    return instruction(content, message_type)


def test_train_returns_weights_sample_count_and_site_only(context):
    # Prepare
    arrays = _global_arrays()

    # Execute
    out = app(_message(MessageType.TRAIN, arrays), context)

    # Assert
    assert not out.has_error()
    assert set(out.content.keys()) == {keys.ARRAYS, keys.METRICS, keys.SITE}
    metrics = out.content[keys.METRICS]
    assert metrics[keys.NUM_EXAMPLES] == metrics[keys.N_TRAIN]  # samples, not batches
    assert metrics[keys.NUM_EXAMPLES] > compose_config(OVERRIDES).train.batch_size  # would catch len(loader)
    assert math.isfinite(metrics[keys.TRAIN_LOSS])
    assert out.content[keys.SITE][keys.SITE_ID] == "hospital-1"
    new = out.content[keys.ARRAYS].to_numpy_ndarrays()
    old = arrays.to_numpy_ndarrays()
    assert [a.shape for a in new] == [a.shape for a in old]
    assert any(not np.allclose(a, b) for a, b in zip(new, old, strict=True))  # it trained


def test_evaluate_returns_validation_metrics(context):
    # Execute
    out = app(_message(MessageType.EVALUATE, _global_arrays()), context)

    # Assert
    assert not out.has_error()
    assert set(out.content.keys()) == {keys.METRICS, keys.SITE}
    metrics = out.content[keys.METRICS]
    for name in ("auc", "acc", "bal_acc", "f1", "sensitivity", "specificity"):
        assert f"{keys.EVAL_PREFIX}{name}" in metrics
    assert metrics[keys.NUM_EXAMPLES] == metrics[keys.N_VAL] > 0


def test_incompatible_weights_fail_with_a_phi_free_reason(context):
    # Prepare: a model of another shape
    wrong = ArrayRecord([np.zeros((3, 3), dtype=np.float32)])

    # Execute / Assert
    with pytest.raises(SiteFailure) as info:
        app(_message(MessageType.TRAIN, wrong), context)
    assert "IncompatibleUpdateError" in str(info.value)
    assert str(context.run_config[keys.RUN_CACHE_DIR]) not in str(info.value)


def test_node_without_data_is_refused_clearly(context):
    # Prepare
    context.node_config = {}

    # Execute / Assert
    with pytest.raises(SiteFailure, match="SiteDataError: This SuperNode has no data configured"):
        app(_message(MessageType.TRAIN, _global_arrays()), context)


def test_config_is_composed_once_per_node_and_follows_the_run_config(context, monkeypatch):
    # Prepare
    import medfed.client.app as client_app

    calls = []
    real = client_app.compose_config
    monkeypatch.setattr(client_app, "compose_config", lambda o: calls.append(o) or real(o))

    # Execute
    first = client_app.node_config(context)
    second = client_app.node_config(context)
    context.run_config = run_config_from_overrides([*OVERRIDES, "train.lr=0.05"])
    third = client_app.node_config(context)

    # Assert
    assert first == second and len(calls) == 2
    assert third.train.lr == 0.05


def test_a_deployed_hospital_sets_its_own_cpu_threads(context):
    # Prepare: the site config says 1 thread; the coordinator's recipe says nothing (0 = every core)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    context.node_config[keys.NODE_THREADS] = 1.0
    try:
        # Execute
        out = app(_message(MessageType.EVALUATE, _global_arrays()), context)

        # Assert
        assert not out.has_error() and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_unexpected_error_leaves_the_site_without_its_text(context, monkeypatch):
    # Prepare: an error medfed did not foresee, whose text names a patient's file (issue 28: forwarding its raw
    # text went unnoticed)
    import medfed.client.app as client_app

    def crash(*args, **kwargs):
        raise OSError("cannot read /data/patients/jane-doe/0001.dcm: Input/output error")

    monkeypatch.setattr(client_app, "node_config", crash)

    # Execute
    with pytest.raises(SiteFailure) as info:
        app(_message(MessageType.TRAIN, _global_arrays()), context)

    # Assert: only the error's type and the message type leave; the text stays in the local log
    reason = str(info.value)
    assert reason == "OSError while handling train; details are in the hospital's local log."
    assert "jane" not in reason and "/data" not in reason and ".dcm" not in reason
