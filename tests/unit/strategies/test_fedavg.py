"""FedAvg through medfed's registry and observer: sample-weighted averages computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from medfed.common import keys
from medfed.common.config import StrategyConfig, compose_config
from medfed.common.errors import ConfigError
from medfed.strategies import ObservedStrategy, available_strategies, build_strategy, weighted_mean_ignoring_nan
from tests.conftest import instruction, reply


def _train_reply(node: int, site: str, weights: list[np.ndarray], n: int, loss: float):
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord(weights),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss}),
            keys.SITE: ConfigRecord({keys.SITE_ID: site}),
        }
    )
    return reply(content, src_node_id=node)


def test_fedavg_weights_by_number_of_samples():
    # Prepare: two hospitals, 10 and 30 samples
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))
    replies = [
        _train_reply(1, "hospital-0", [np.array([1.0, 2.0]), np.array([[0.0]])], 10, 1.0),
        _train_reply(2, "hospital-1", [np.array([5.0, 6.0]), np.array([[4.0]])], 30, 3.0),
    ]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: (10*x0 + 30*x1) / 40, by hand
    got = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(got[0], [4.0, 5.0])
    np.testing.assert_allclose(got[1], [[3.0]])
    assert metrics[keys.TRAIN_LOSS] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    observed = strategy.take_observations()
    assert set(observed.train) == {"hospital-0", "hospital-1"}
    assert observed.train["hospital-1"][keys.NUM_EXAMPLES] == 30


def _metered_reply(node: int, site: str, weights: list[np.ndarray], noised_size: float | None):
    metrics = {keys.NUM_EXAMPLES: 1, keys.EPSILON: 1.0, keys.DELTA: 1e-5, keys.NOISE_MULTIPLIER: 1.2}
    if noised_size is not None:
        metrics[keys.NOISED_TRAIN_COUNT] = noised_size
    content = RecordDict({keys.ARRAYS: ArrayRecord(weights), keys.METRICS: MetricRecord(metrics),
                          keys.SITE: ConfigRecord({keys.SITE_ID: site})})
    return reply(content, src_node_id=node)


def test_metered_replies_are_weighed_by_the_noised_size_each_site_sent_once():
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))
    first = [_metered_reply(1, "hospital-0", [np.array([1.0])], 100.0),
             _metered_reply(2, "hospital-1", [np.array([5.0])], 300.0),
             _metered_reply(3, "hospital-2", [np.array([9.0])], -4.0)]  # noise pushed a tiny site below 0

    arrays, _ = strategy.aggregate_train(1, first)

    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [(100 * 1 + 300 * 5 + 1 * 9) / 401])
    # later rounds carry no size: each site keeps its weight; a site never sized weighs the mean of the known
    later = [_metered_reply(1, "hospital-0", [np.array([1.0])], None),
             _metered_reply(2, "hospital-1", [np.array([5.0])], None),
             _metered_reply(4, "hospital-3", [np.array([2.0])], None)]
    arrays, _ = strategy.aggregate_train(2, later)
    mean = (100 + 300 + 1) / 3
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [(100 * 1 + 300 * 5 + mean * 2) / (400 + mean)])


def test_failed_hospital_is_recorded_and_the_others_are_averaged():
    # Prepare
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))
    ok = _train_reply(1, "hospital-0", [np.array([2.0])], 5, 0.5)
    failed = reply(None, src_node_id=2, error=Error(code=0, reason="SiteFailure: out of memory"))

    # Execute
    arrays, _ = strategy.aggregate_train(3, [ok, failed])

    # Assert
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [2.0])
    observed = strategy.take_observations()
    assert [(d.site_id, d.phase) for d in observed.dropped] == [("node-2", "train")]
    assert "out of memory" in observed.dropped[0].reason
    assert strategy.take_observations().dropped == []  # a fresh record per round


def test_the_run_stops_cleanly_when_every_hospital_is_at_its_privacy_cap():
    # Prepare
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))
    refusals = [
        reply(None, src_node_id=n, error=Error(code=0, reason="PrivacyBudgetExceeded: Privacy cap reached: ..."))
        for n in (1, 2)
    ]
    other_failure = [reply(None, src_node_id=3, error=Error(code=0, reason="SiteFailure: out of memory"))]

    # Execute
    strategy.aggregate_train(2, other_failure)
    still_running = strategy.stop_reason is None
    arrays, _ = strategy.aggregate_train(3, refusals)

    # Assert
    assert still_running  # a failure of another kind is not a reason to end the run
    assert arrays is None
    assert strategy.stopped_after == 3 and "privacy cap" in strategy.stop_reason
    assert list(strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid=None)) == []
    assert list(strategy.configure_evaluate(4, ArrayRecord(), ConfigRecord(), grid=None)) == []


def test_nan_metric_of_one_site_does_not_poison_the_federation():
    # Prepare: hospital-1's validation split holds one class, so its AUC is undefined
    records = [
        RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, "val-auc": 0.8, "val-acc": 0.5})}),
        RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 30, "val-auc": math.nan, "val-acc": 0.9})}),
    ]

    # Execute
    agg = weighted_mean_ignoring_nan(records, keys.NUM_EXAMPLES)

    # Assert
    assert agg["val-auc"] == pytest.approx(0.8)  # only the site where it is defined votes
    assert agg["val-acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert keys.NUM_EXAMPLES not in agg


def test_metric_undefined_everywhere_stays_nan():
    records = [RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, "val-auc": math.nan})})]
    assert math.isnan(weighted_mean_ignoring_nan(records, keys.NUM_EXAMPLES)["val-auc"])


def test_round_offset_reaches_the_wrapped_strategy():
    # Prepare
    seen = {}

    class Spy(type(build_strategy(StrategyConfig()))):
        def configure_train(self, server_round, arrays, config, grid):
            seen["round"] = server_round
            return []

    strategy = ObservedStrategy(Spy(), round_offset=4)

    # Execute
    strategy.configure_train(1, ArrayRecord([np.zeros(1)]), ConfigRecord(), grid=None)

    # Assert
    assert seen["round"] == 5


def test_unknown_strategy_lists_choices():
    assert "fedavg" in available_strategies()
    with pytest.raises(ConfigError, match="strategy.name='fedsgd' is not a registered strategy; choose one of: fedadagrad, fedadam, fedavg"):
        build_strategy(StrategyConfig(name="fedsgd"))


def test_aggregation_does_not_depend_on_the_order_replies_arrive_in():
    # Prepare: float32 values whose weighted sum depends on the summation order (Flower's FedAvg alone gives
    # 0.0 or 0.333 depending on arrival order; nodes are sampled in random order, so runs drifted apart)
    import itertools

    replies = [
        _train_reply(1, "hospital-0", [np.array([3e7], dtype=np.float32)], 10, 0.1),
        _train_reply(2, "hospital-1", [np.array([1.0], dtype=np.float32)], 10, 0.1),
        _train_reply(3, "hospital-2", [np.array([-3e7], dtype=np.float32)], 10, 0.1),
    ]
    inner = build_strategy(StrategyConfig())
    plain = {float(inner.aggregate_train(1, list(p))[0].to_numpy_ndarrays()[0][0]) for p in itertools.permutations(replies)}
    assert len(plain) > 1  # the hazard is real

    # Execute
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))
    results = {
        float(strategy.aggregate_train(1, list(p))[0].to_numpy_ndarrays()[0][0]) for p in itertools.permutations(replies)
    }

    # Assert
    assert len(results) == 1


def test_a_hospital_that_never_replies_is_recorded_as_dropped():
    # Prepare: the round asks three hospitals; Flower hands over only the replies that came before the timeout
    class AskThree(type(build_strategy(StrategyConfig()))):
        def configure_train(self, server_round, arrays, config, grid):
            return [instruction(RecordDict({keys.ARRAYS: arrays}), "train", dst_node_id=n) for n in (1, 2, 3)]

    strategy = ObservedStrategy(AskThree())
    strategy._site_of_node[3] = "hospital-2"  # known from an earlier round
    sent = list(strategy.configure_train(1, ArrayRecord([np.zeros(1)]), ConfigRecord(), grid=None))

    # Execute
    arrays, _ = strategy.aggregate_train(1, [
        _train_reply(1, "hospital-0", [np.array([1.0])], 5, 0.1),
        _train_reply(2, "hospital-1", [np.array([3.0])], 5, 0.1),
    ])

    # Assert: the two replies are averaged; the silent one is named, with the setting that bounds the wait
    assert len(sent) == 3
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [2.0])
    dropped = strategy.take_observations().dropped
    assert [(d.site_id, d.phase) for d in dropped] == [("hospital-2", "train")]
    assert "strategy.round_timeout_s" in dropped[0].reason


def test_the_superlinks_error_for_an_offline_hospital_names_that_hospital():
    # Prepare: Flower's SuperLink answers for a hospital that stopped sending heartbeats, from its own node id (1),
    # replying to the instruction that went to the hospital
    class AskTwo(type(build_strategy(StrategyConfig()))):
        def configure_train(self, server_round, arrays, config, grid):
            return [instruction(RecordDict({keys.ARRAYS: arrays}), "train", dst_node_id=n, message_id=f"m-{n}")
                    for n in (5, 6)]

    strategy = ObservedStrategy(AskTwo())
    strategy.configure_train(1, ArrayRecord([np.zeros(1)]), ConfigRecord(), grid=None)
    ok = _train_reply(5, "hospital-0", [np.array([1.0])], 5, 0.1)
    unavailable = reply(None, src_node_id=1, error=Error(code=5, reason="Error: Node Unavailable"))
    unavailable.metadata.__dict__["_reply_to_message_id"] = "m-6"

    # Execute
    strategy.aggregate_train(1, [ok, unavailable])

    # Assert: one drop, of node 6, with Flower's reason (not a drop of "node-1" plus a silent node 6)
    dropped = strategy.take_observations().dropped
    assert [(d.site_id, d.reason) for d in dropped] == [("node-6", "Error: Node Unavailable")]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("fraction", "minimum", "asked"), [(1.0, 2, 5), (0.6, 2, 3), (0.2, 2, 2), (0.4, 4, 4)])
def test_partial_participation_asks_a_fraction_of_hospitals_but_never_fewer_than_the_minimum(fraction, minimum, asked):
    # Prepare: 5 hospitals online
    class FiveHospitals:
        run_id = 1

        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    cfg = compose_config(["federation.hospitals=5", f"strategy.fraction_train={fraction}",
                          f"strategy.min_train_nodes={minimum}"])

    # Execute
    messages = list(build_strategy(cfg.strategy).configure_train(1, ArrayRecord([np.zeros(1)]), ConfigRecord(),
                                                                 FiveHospitals()))

    # Assert: int(fraction x online), at least min_train_nodes, each hospital once
    destinations = [m.metadata.dst_node_id for m in messages]
    assert len(destinations) == asked == len(set(destinations))
