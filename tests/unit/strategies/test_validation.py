"""Update validation before aggregation: malformed, non-finite and absurd updates are rejected, the round goes on."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.common import keys
from medfed.common.config import StrategyConfig
from medfed.strategies import ObservedStrategy, build_strategy
from medfed.strategies.validation import check_updates
from tests.conftest import instruction, reply

NAMES = ["w", "b"]
GLOBAL = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]


def _update(scale: float, seed: int) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return NAMES, [(scale * rng.normal(size=a.shape)).astype(np.float32) for a in GLOBAL]


def test_well_formed_updates_pass():
    assert check_updates(NAMES, GLOBAL, [_update(1.0, s) for s in range(4)], max_norm_ratio=10) == [None] * 4


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((NAMES, [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]), r"array 'w' has shape \(3, 2\), the global"),
        ((["w"], [np.zeros((2, 2), np.float32)]), r"do not match the global model's \(missing \['b'\]"),
        ((NAMES, [np.full((2, 2), np.nan, np.float32), np.zeros(2, np.float32)]), r"array 'w' holds NaN or inf"),
        (_update(100.0, 9), r"is \d+\.\d x the round's median .* \(strategy.max_update_norm_ratio=10\)"),  # scaled x100
    ],
)
def test_a_bad_update_is_rejected_with_a_reason(bad, match):
    reasons = check_updates(NAMES, GLOBAL, [_update(1.0, 0), bad, _update(1.0, 1), _update(1.0, 2)], max_norm_ratio=10)
    assert reasons[0] is None and reasons[2] is None and reasons[3] is None
    assert reasons[1] is not None
    import re

    assert re.search(match, reasons[1]), reasons[1]


def test_the_norm_check_needs_three_updates_and_can_be_turned_off():
    two = [_update(1.0, 0), _update(100.0, 1)]
    four = [_update(1.0, 0), _update(100.0, 1), _update(1.0, 2), _update(1.0, 3)]
    assert check_updates(NAMES, GLOBAL, two, max_norm_ratio=10) == [None, None]  # neither is the outlier
    assert check_updates(NAMES, GLOBAL, four, max_norm_ratio=0) == [None] * 4


def _record(arrays: list[np.ndarray]) -> ArrayRecord:
    import torch

    return ArrayRecord({name: torch.from_numpy(a) for name, a in zip(NAMES, arrays, strict=True)})


def _train_reply(node: int, site: str, arrays: list[np.ndarray], n: int = 10):
    content = RecordDict({
        keys.ARRAYS: _record(arrays),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.5}),
        keys.SITE: ConfigRecord({keys.SITE_ID: site}),
    })
    return reply(content, src_node_id=node)


def test_a_poisoned_hospital_is_dropped_and_the_round_averages_the_others():
    # Prepare: 4 hospitals; hospital-3 sends its update scaled x100, hospital-2 a model of another shape
    class AskFour(type(build_strategy(StrategyConfig()))):
        def configure_train(self, server_round, arrays, config, grid):
            return [instruction(RecordDict({keys.ARRAYS: arrays}), "train", dst_node_id=n, message_id=f"m-{n}")
                    for n in (1, 2, 3, 4)]

    strategy = ObservedStrategy(AskFour(), max_update_norm_ratio=10)
    strategy.configure_train(1, _record(GLOBAL), ConfigRecord(), grid=None)
    clean = [_update(1.0, s)[1] for s in (0, 1)]
    replies = [
        _train_reply(1, "hospital-0", clean[0]),
        _train_reply(2, "hospital-1", clean[1]),
        _train_reply(3, "hospital-2", [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]),
        _train_reply(4, "hospital-3", [100 * a for a in _update(1.0, 2)[1]]),
    ]
    with pytest.raises(Exception):  # the hazard: Flower's FedAvg alone fails on the odd shape, ending the run
        build_strategy(StrategyConfig()).aggregate_train(1, replies)

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the two clean updates are averaged (equal sample counts); the two others are named, with reasons
    np.testing.assert_allclose(arrays["w"].numpy(), (clean[0][0] + clean[1][0]) / 2, rtol=1e-6)
    observed = strategy.take_observations()
    assert set(observed.train) == {"hospital-0", "hospital-1"}
    reasons = {d.site_id: d.reason for d in observed.dropped}
    assert set(reasons) == {"hospital-2", "hospital-3"}
    assert "shape (3, 2)" in reasons["hospital-2"] and "max_update_norm_ratio" in reasons["hospital-3"]
