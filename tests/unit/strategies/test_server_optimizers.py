"""Server optimizers: Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad through medfed's config and registry,
against updates computed by hand, and their state through a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.errors import ConfigError
from medfed.server.runs import RunDirectory
from medfed.strategies import ObservedStrategy, build_strategy
from medfed.strategies.server_optimizers import restore_strategy_state, strategy_state
from tests.conftest import reply

X0 = 1.0  # the one-weight global model
ROUNDS = [[2.0, 4.0], [1.0, 5.0], [0.0, -2.0]]  # each round's two hospital models (equal sample counts)
NAMES = ["w"]

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps the messages a strategy builds


class _Grid:
    """The two hospitals a strategy samples from (Flower's sampling only asks a grid for node ids)."""

    run_id = 1

    def get_node_ids(self):
        return [1, 2]


def _record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array([value], dtype=np.float32))})


def _replies(values: list[float]):
    return [
        reply(RecordDict({
            keys.ARRAYS: _record(v),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.1}),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"hospital-{i}"}),
        }), src_node_id=i + 1)
        for i, v in enumerate(values)
    ]


def _strategy(overrides: list[str]):
    return build_strategy(compose_config(["federation.hospitals=2", *overrides]).strategy)


def _round(strategy, server_round: int, x: float, values: list[float]) -> float:
    list(strategy.configure_train(server_round, _record(x), ConfigRecord(), _Grid()))
    arrays, _ = strategy.aggregate_train(server_round, _replies(values))
    out = arrays["w"].numpy()
    assert out.dtype == np.float32  # Flower's arithmetic promotes to float64; medfed keeps the model's dtype
    return float(out[0])


def _run(strategy, rounds=ROUNDS, start: int = 1, x: float = X0) -> list[float]:
    trajectory = []
    for offset, values in enumerate(rounds):
        x = _round(strategy, start + offset, x, values)
        trajectory.append(x)
    return trajectory


def _adam_by_hand(yogi: bool, eta=1e-3, tau=1e-3, b1=0.9, b2=0.99) -> list[float]:  # (the schema's defaults)
    x, m, v, out = X0, 0.0, 0.0, []
    for t, values in enumerate(ROUNDS, start=1):
        x32 = float(np.float32(x))
        delta = float(np.mean(values)) - x32
        m = b1 * m + (1 - b1) * delta
        if yogi:
            v = v - (1 - b2) * delta**2 * math.copysign(1.0, v - delta**2) if v != delta**2 else v
            step = eta
        else:
            v = b2 * v + (1 - b2) * delta**2
            step = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))  # Flower's bias correction
        x = x32 + step * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


def test_fedadam_steps_by_hand():
    assert _run(_strategy(["strategy=fedadam"])) == pytest.approx(_adam_by_hand(yogi=False), rel=1e-5)


def test_fedyogi_steps_by_hand():
    assert _run(_strategy(["strategy=fedyogi"])) == pytest.approx(_adam_by_hand(yogi=True), rel=1e-5)


def test_fedadagrad_steps_by_hand():
    x, v, expected = X0, 0.0, []
    for values in ROUNDS:
        delta = float(np.mean(values)) - float(np.float32(x))
        v += delta**2
        x = float(np.float32(x)) + 0.05 * delta / (math.sqrt(v) + 0.01)
        expected.append(x)
    got = _run(_strategy(["strategy=fedadagrad", "strategy.eta=0.05", "strategy.tau=0.01"]))
    assert got == pytest.approx(expected, rel=1e-5)


def test_fedavgm_applies_momentum_to_the_pseudo_gradient():
    # pseudo-gradient g = x - mean; momentum buffer b = 0.5 b + g (the first b = g); x <- x - lr * b
    x, b, expected = X0, None, []
    for values in ROUNDS:
        g = x - float(np.mean(values))
        b = g if b is None else 0.5 * b + g
        x = x - 0.8 * b
        expected.append(x)
    got = _run(_strategy(["strategy=fedavgm", "strategy.server_momentum=0.5", "strategy.server_learning_rate=0.8"]))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_resume_continues_the_optimizer_state_exactly(tmp_path, name):
    # Prepare: the uninterrupted run, and the same run stopped after round 2 with its state checkpointed
    uninterrupted = _run(_strategy([f"strategy={name}"]))
    first = _strategy([f"strategy={name}"])
    x2 = _run(first, ROUNDS[:2])[-1]
    run = RunDirectory(tmp_path / "run")
    (run.path / "checkpoints").mkdir(parents=True)
    run.save_weights(run.last_checkpoint_path, {"w": np.array([x2], np.float32)}, {"round": 2},
                     strategy_state=strategy_state(ObservedStrategy(first)))  # found under medfed's wrapper

    # Execute: a new strategy (as after a coordinator restart), with and without the checkpointed state
    resumed = _strategy([f"strategy={name}"])
    assert restore_strategy_state(ObservedStrategy(resumed), run.load_strategy_state(), NAMES)
    fresh = _strategy([f"strategy={name}"])

    # Assert: round 3 is exactly the uninterrupted one; forgetting the state would change it
    assert _run(resumed, ROUNDS[2:], start=3, x=x2) == [uninterrupted[2]]
    assert _run(fresh, ROUNDS[2:], start=3, x=x2) != [uninterrupted[2]]


def test_stateless_strategies_save_no_state_and_refuse_foreign_state():
    fedavg = _strategy([])
    _run(fedavg)
    assert strategy_state(fedavg) == {}
    assert restore_strategy_state(fedavg, {}, NAMES) is False
    with pytest.raises(ConfigError, match="keeps none; resume with the strategy the run was started with"):
        restore_strategy_state(fedavg, {"m_t/w": np.zeros(1)}, NAMES)


def test_state_of_another_model_is_refused_naming_the_layers():
    with pytest.raises(ConfigError, match=r"does not fit the model \(missing \['w'\], unexpected \['conv.weight'\]\)"):
        restore_strategy_state(_strategy(["strategy=fedadam"]), {"m_t/conv.weight": np.zeros(1)}, NAMES)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy=fedadam", "strategy.eta=0"], r"strategy.eta=0.0 is out of range; it must be > 0"),
        (["strategy=fedyogi", "strategy.beta_2=1.0"], r"strategy.beta_2=1.0 is out of range; it must lie in \[0, 1\)"),
        (["strategy=fedadagrad", "strategy.beta_1=0.9"], r"strategy.beta_1"),  # Adagrad has no moments to decay
        (["strategy=fedavgm", "strategy.server_momentum=1.0"], r"strategy.server_momentum=1.0 is out of range"),
        (["strategy=fedadam", "privacy.secure_aggregation=true"], r"strategy=fedadam cannot run with privacy.secure"),
    ],
)
def test_bad_server_optimizer_options_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)
