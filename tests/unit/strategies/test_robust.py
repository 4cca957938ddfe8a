"""Robust aggregation: Flower's FedMedian, FedTrimmedAvg, Krum and MultiKrum through medfed's config and registry,
against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.errors import ConfigError
from medfed.strategies import build_strategy
from tests.conftest import reply

# one scalar weight per hospital; the last one is far off (a broken or hostile hospital)
VALUES = [0.0, 1.0, 1.5, 3.0, 100.0]


def _replies(values: list[float], n: list[int] | None = None):
    counts = n or [10] * len(values)
    return [
        reply(RecordDict({
            keys.ARRAYS: ArrayRecord([np.array([v], dtype=np.float64)]),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: c, keys.TRAIN_LOSS: 0.1}),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"hospital-{i}"}),
        }), src_node_id=i + 1)
        for i, (v, c) in enumerate(zip(values, counts, strict=True))
    ]


def _aggregate(overrides: list[str], values: list[float], n: list[int] | None = None) -> float:
    cfg = compose_config(["federation.hospitals=5", *overrides])
    arrays, _ = build_strategy(cfg.strategy).aggregate_train(1, _replies(values, n))
    return float(arrays.to_numpy_ndarrays()[0][0])


def test_fedavg_is_pulled_by_the_outlier():
    assert _aggregate([], VALUES) == pytest.approx(sum(VALUES) / 5)  # 21.1


def test_fedmedian_takes_the_coordinate_median_whatever_the_sample_counts():
    assert _aggregate(["strategy=fedmedian"], VALUES, n=[1, 1, 1, 1, 1000]) == pytest.approx(1.5)


def test_fedtrimmedavg_cuts_beta_at_each_end():
    # beta 0.2 of 5: one update cut at each end -> mean(1, 1.5, 3)
    assert _aggregate(["strategy=fedtrimmedavg", "strategy.beta=0.2"], VALUES) == pytest.approx((1 + 1.5 + 3) / 3)


def test_krum_keeps_the_update_closest_to_its_neighbours():
    # f = 1 attacker: each update's score is the sum of squared distances to its n - f - 2 = 2 nearest others:
    # 0 -> 1 + 2.25 = 3.25; 1 -> 0.25 + 1 = 1.25; 1.5 -> 0.25 + 2.25 = 2.5; 3 -> 2.25 + 4 = 6.25; 100 -> huge
    assert _aggregate(["strategy=krum", "strategy.num_malicious_nodes=1"], VALUES) == pytest.approx(1.0)


def test_multikrum_averages_the_best_scored_updates():
    # the two best scores: 1 (1.25) and 1.5 (2.5), equal sample counts
    overrides = ["strategy=multikrum", "strategy.num_malicious_nodes=1", "strategy.num_nodes_to_select=2"]
    assert _aggregate(overrides, VALUES) == pytest.approx(1.25)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy=fedtrimmedavg", "strategy.beta=0.5"], r"strategy.beta=0.5 is out of range; it must lie in \[0, 0.5\)"),
        (["strategy=krum", "strategy.num_malicious_nodes=-1"], r"strategy.num_malicious_nodes=-1 is out of range"),
        (["strategy.beta=0.2"], r"strategy.beta"),  # fedavg has no beta: a typo-proof schema
        (["strategy=krum", "privacy.secure_aggregation=true"], r"strategy=krum cannot run with privacy.secure_aggregation"),
        (["strategy=bulyan"], r"strategy='bulyan' is not a known strategy option; choose one of: fedadagrad, fedadam, fedavg"),
    ],
)
def test_bad_strategy_options_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)
