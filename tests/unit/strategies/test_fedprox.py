"""FedProx: Flower's strategy sends mu; the hospital adds (mu / 2) * ||w - w_global||^2 to its local loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from medfed.client.app import app
from medfed.client.training import proximal_term, train_epochs
from medfed.common import keys
from medfed.common.config import compose_config, run_config_from_overrides
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError
from medfed.common.models import build_model
from medfed.strategies import build_strategy
from tests.conftest import instruction

OVERRIDES = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3", "strategy=fedprox"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose_config(OVERRIDES).model, spatial_dims=2, in_channels=1, n_classes=2)


def test_the_proximal_gradient_is_mu_times_the_distance():
    model = _model()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    proximal_term(model, anchor, mu=0.7).backward()

    for p, a in zip(model.parameters(), anchor, strict=True):
        torch.testing.assert_close(p.grad, 0.7 * (p.detach() - a))


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True))))


def _local_training(mu: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    data = ArrayDataset(images=rng.normal(size=(64, 1, 28, 28)).astype(np.float32),
                        labels=rng.integers(0, 2, size=64).astype(np.int64))
    model = _model()
    cfg = compose_config([*OVERRIDES, "train.batch_size=16", "train.lr=0.05"]).train
    train_epochs(model, data, cfg, epochs=2, n_classes=2, spatial_dims=2, seed=1, proximal_mu=mu)
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_mu_zero_is_fedavgs_local_training_and_a_large_mu_stays_near_the_global_model():
    start = [p.detach().numpy().copy() for p in _model().parameters()]
    plain, zero, strong = _local_training(0.0), _local_training(0.0), _local_training(100.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero, strict=True))
    assert _distance(strong, start) < 0.5 * _distance(plain, start)


def test_fedprox_aggregates_as_fedavg_and_sends_mu():
    from tests.unit.strategies.test_fedavg import _train_reply

    replies = [_train_reply(1, "hospital-0", [np.array([1.0])], 10, 0.1),
               _train_reply(2, "hospital-1", [np.array([4.0])], 30, 0.1)]
    prox = build_strategy(compose_config([*OVERRIDES, "strategy.mu=0.5"]).strategy)
    fedavg = build_strategy(compose_config(OVERRIDES[:-1]).strategy)
    assert prox.proximal_mu == 0.5
    np.testing.assert_allclose(prox.aggregate_train(1, replies)[0].to_numpy_ndarrays()[0],
                               fedavg.aggregate_train(1, replies)[0].to_numpy_ndarrays()[0])


def test_the_hospital_takes_mu_from_the_round_config(tmp_path):
    # Prepare: the same global model and site, trained with the mu Flower's FedProx put in the message
    context = Context(run_id=1, node_id=7, node_config={keys.NODE_PARTITION_ID: 1, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config_from_overrides(
                          OVERRIDES, **{keys.RUN_CACHE_DIR: str(tmp_path / "cache")}))
    start = ArrayRecord(_model().state_dict())

    def trained(mu: float) -> list[np.ndarray]:
        config = ConfigRecord({keys.SERVER_ROUND: 1, keys.PROXIMAL_MU: mu})
        out = app(instruction(RecordDict({keys.ARRAYS: start, keys.CONFIG: config}), MessageType.TRAIN), context)
        assert not out.has_error()
        return out.content[keys.ARRAYS].to_numpy_ndarrays()

    # Execute / Assert
    assert _distance(trained(100.0), start.to_numpy_ndarrays()) < 0.5 * _distance(trained(0.0), start.to_numpy_ndarrays())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy=fedprox", "strategy.mu=-1"], r"strategy.mu=-1.0 is out of range"),
        (["strategy=fedprox", "privacy=dp"], r"strategy=fedprox cannot run with privacy=dp"),
    ],
)
def test_bad_fedprox_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)
