"""The Ray node each simulated hospital's reply came from: kept per site and round by the observer, written as
``ray_node`` in the site's entry of metrics.jsonl (absent where a reply names none, as a deployed hospital's)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.common import keys
from medfed.common.config import StrategyConfig
from medfed.server.tracking import site_rounds
from medfed.strategies import ObservedStrategy, build_strategy
from tests.conftest import reply


def _reply(node: int, site: str, ray_node: str | None, *, message_type: str = "train"):
    record = {keys.SITE_ID: site, **({keys.RAY_NODE: ray_node} if ray_node else {})}
    content = RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0}),
                          keys.SITE: ConfigRecord(record)})
    if message_type == "train":
        content[keys.ARRAYS] = ArrayRecord([np.array([float(node)])])
    return reply(content, src_node_id=node, message_type=message_type)


def test_each_sites_ray_node_is_recorded_training_first():
    # Prepare
    strategy = ObservedStrategy(build_strategy(StrategyConfig()))

    # Execute: hospital-0 trained on node a and evaluated on node b; hospital-1 (deployed) names no node
    strategy.aggregate_train(1, [_reply(1, "hospital-0", "node-a"), _reply(2, "hospital-1", None)])
    strategy.aggregate_evaluate(1, [_reply(1, "hospital-0", "node-b", message_type="evaluate"),
                                    _reply(2, "hospital-1", None, message_type="evaluate")])
    observed = strategy.take_observations()

    # Assert
    assert observed.nodes == {"hospital-0": "node-a"}
    sites = site_rounds(observed.train, observed.evaluate, nodes=observed.nodes)
    assert sites["hospital-0"].as_record()["ray_node"] == "node-a"
    assert "ray_node" not in sites["hospital-1"].as_record()
    assert strategy.take_observations().nodes == {}  # a fresh record each round
