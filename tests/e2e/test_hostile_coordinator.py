"""A hostile coordinator (a real Flower ServerApp, tests/hostile_coordinator.py) attacks two deployed hospitals
running the real medfed ClientApp: a strict one (the site-config defaults: DP required, Grad-CAM off, cap 10) and
a permissive research site (DP not required, every stage). With the strict policy every attack is refused or
answered only with noised statistics charged to its ledger, and the ledger's epsilon is the composition of exactly
what it answered (issue 21)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medfed.client.ledger import LedgerEntry
from medfed.client.privacy import epsilon_spent
from medfed.client.site import SiteConfig, load_site_config, node_config_for, write_site_config
from medfed.common import keys
from medfed.common.noised_stats import EvalStatistics
from tests.hostile_coordinator import Hospital, SiteGrid, evaluate, final, run_attack, train

STRICT, PERMISSIVE = 1, 2
RECIPE = ["train.rounds=3", "train.local_epochs=1", "train.batch_size=16"]
DP = [*RECIPE, "privacy=dp", "privacy.target_epsilon=8"]
# what a strict hospital's metered evaluation may carry: noised statistics and data-independent numbers
NOISED_KEYS = {keys.NUM_EXAMPLES, keys.DP_CLASSES, keys.EVAL_NOISE, keys.EPSILON, keys.EPSILON_CHARGED, keys.DELTA}
N_IMAGES, N_RARE = 60, 9


def _hospital(folder: Path, node_id: int, **policy: Any) -> Hospital:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(node_id)
    labels = np.array([0] * N_RARE + [1] * (N_IMAGES - N_RARE))
    images = (rng.random((N_IMAGES, 1, 28, 28)) * 0.2 + labels[:, None, None, None] * 0.5).astype(np.float32)
    np.savez(folder / "data.npz", images=images, labels=labels)
    write_site_config(SiteConfig(site_id=f"site-{node_id}", data_path="data.npz", n_classes=2, secure_rng=False,
                                 val_fraction=0.5, **policy), folder / "site.yaml")
    return Hospital(node_id, node_config_for(load_site_config(folder / "site.yaml")))


@pytest.fixture
def hospitals(tmp_path: Path) -> list[Hospital]:
    return [_hospital(tmp_path / "strict", STRICT),
            _hospital(tmp_path / "research", PERMISSIVE, require_dp=False, stages=["train", "ssl", "evaluate",
                      "calibrate", "reliability", "gradcam", "audit"], max_epsilon=1e9)]


def _ledger(tmp_path: Path, name: str = "strict") -> list[LedgerEntry]:
    files = list((tmp_path / name / "state" / "privacy").glob("*.json"))
    return [LedgerEntry(**e) for f in files for e in json.loads(f.read_text())["entries"]]


def _of(answers: list[dict[str, Any]], node: int) -> list[dict[str, Any]]:
    return [a for a in answers if a["node"] == node]


def _answered(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in answers if "error" not in a]


def _assert_noised_only(answer: dict[str, Any]) -> None:
    metrics = answer["metrics"]
    extra = {k for k in metrics if not k.startswith(keys.DP_STAT_PREFIX)} - NOISED_KEYS
    assert not extra, f"a strict hospital sent exact numbers: {extra}"
    assert metrics[keys.NUM_EXAMPLES] == 1
    assert metrics[keys.EVAL_NOISE] > 1.0


def _releases(answered: list[dict[str, Any]]) -> int:
    """The releases a list of answers made: one each, and the noised training-set size a run's first round
    carries is one more."""
    return len(answered) + sum(1 for a in answered if keys.NOISED_TRAIN_COUNT in a["metrics"])


def _assert_ledger_is_what_was_answered(tmp_path: Path, answered: list[dict[str, Any]]) -> None:
    """Every answer is in the ledger, nothing else is, and the last answer's epsilon is the ledger's."""
    entries = _ledger(tmp_path)
    assert len(entries) == _releases(answered)
    if answered:
        assert answered[-1]["metrics"][keys.EPSILON] == pytest.approx(epsilon_spent(entries, 1e-5), rel=1e-9)


def test_privacy_none_is_refused_by_the_strict_site_and_trained_by_the_research_site(tmp_path, hospitals):
    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=RECIPE), RECIPE, [train(1)])

    (strict,) = _of(answers, STRICT)
    (research,) = _of(answers, PERMISSIVE)
    assert "PolicyRefusal" in strict["error"] and "privacy=none" in strict["error"]
    assert research["arrays"] == [keys.ARRAYS]  # the research site trained and sent its model
    assert _ledger(tmp_path) == []


def test_a_huge_target_epsilon_does_not_pass_the_sites_cap(tmp_path, hospitals):
    recipe = [*RECIPE, "privacy=dp", "privacy.target_epsilon=1000000"]
    requests = [r for k in (1, 2, 3) for r in (train(k), evaluate(k))]

    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=recipe), recipe, requests)

    strict = _of(answers, STRICT)
    answered = _answered(strict)
    assert all(a["metrics"][keys.EPSILON] <= 10.0 for a in answered)
    assert all("PrivacyBudgetExceeded" in a["error"] for a in strict if "error" in a)
    assert epsilon_spent(_ledger(tmp_path), 1e-5) <= 10.0
    _assert_ledger_is_what_was_answered(tmp_path, answered)


def test_a_thousand_evaluate_requests_get_one_noised_charged_answer_per_round(tmp_path, hospitals):
    requests = [evaluate(k % 500) for k in range(1000)]  # rounds 0..499, each asked twice

    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=DP), DP, requests)

    strict = _of(answers, STRICT)
    answered = _answered(strict)
    assert len(strict) == 1000
    assert len(answered) == 4  # rounds 0..3 of a 3-round run, once each
    assert all("PolicyRefusal" in a["error"] for a in strict if "error" in a)
    for answer in answered:
        _assert_noised_only(answer)
    assert [e.kind for e in _ledger(tmp_path)] == ["evaluate"] * 4
    _assert_ledger_is_what_was_answered(tmp_path, answered)


def test_the_constant_model_probe_reads_class_counts_only_where_the_site_allows_exact_metrics(tmp_path, hospitals):
    # the probe: a model predicting class 1 with probability 0.7 for every image. Run without DP: the research
    # site answers exactly, so its accuracy times its count is its count of class 1; the strict site meters.
    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=RECIPE), RECIPE, [evaluate(1)], constant=0.7)

    (research,) = _of(answers, PERMISSIVE)
    exact = research["metrics"]
    assert round(exact["val-acc"] * exact[keys.N_VAL]) == round(exact[keys.N_VAL] * (1 - N_RARE / N_IMAGES))
    (strict,) = _of(answers, STRICT)
    _assert_noised_only(strict)
    stats = EvalStatistics.from_vector(2, [strict["metrics"][f"{keys.DP_STAT_PREFIX}{i}"]
                                           for i in range(EvalStatistics.size(2))])
    assert np.all(stats.histograms != np.round(stats.histograms))  # no bin is an exact count
    (entry,) = _ledger(tmp_path)
    assert entry.kind == "evaluate" and entry.noise_multiplier == strict["metrics"][keys.EVAL_NOISE]


def test_a_500_point_temperature_grid_is_refused_and_a_long_grid_answered_on_nine_noised_points(tmp_path, hospitals):
    long_grid = [float(2 ** (k / 10)) for k in range(-25, 25)]
    requests = [final(keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: [0.5 + k / 100 for k in range(500)]}),
                final(keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: long_grid})]

    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=DP), DP, requests)

    refused, answered = _of(answers, STRICT)
    assert "PolicyRefusal" in refused["error"] and "500 temperatures" in refused["error"]
    metrics = answered["metrics"]
    assert len(metrics[keys.TEMPERATURES]) == len(metrics[keys.NLL_SUMS]) == 9 and 1.0 in metrics[keys.TEMPERATURES]
    assert metrics[keys.NOISED_COUNT] != round(metrics[keys.NOISED_COUNT])  # noised, not the split's size
    assert [e.kind for e in _ledger(tmp_path)] == ["calibrate"]
    _assert_ledger_is_what_was_answered(tmp_path, [answered])


def test_grad_cam_is_never_written_at_the_strict_site_and_no_count_leaves(tmp_path, hospitals):
    recipe = [*DP, "evaluate.gradcam_samples=4"]

    answers = run_attack(SiteGrid(hospitals, run_id=1, overrides=recipe), recipe,
                         [final(keys.STAGE_RELIABILITY, **{keys.TEMPERATURE: 1.0})])

    (strict,) = _of(answers, STRICT)
    (research,) = _of(answers, PERMISSIVE)
    assert keys.GRADCAM_SAVED not in strict["metrics"] and keys.GRADCAM_SAVED not in research["metrics"]
    assert not list((tmp_path / "strict").rglob("*.png"))
    assert list((tmp_path / "research").rglob("*.png"))  # the research site allows maps: kept on its own disk
    assert [e.kind for e in _ledger(tmp_path)] == ["reliability"]


class _Turns:
    """Makes two runs' threads take turns at the hospital, one request each (1, 2, 1, 2, ...): the order in which
    two runs at once reach a site, made deterministic. Python's locks are not fair, so without it one thread may
    take every turn, run 1 end before run 2 starts, and run 2 plan within what run 1 left (the next test)."""

    def __init__(self) -> None:
        self.next = 1
        self.changed = threading.Condition()

    def grid(self, hospital: Hospital, run_id: int) -> SiteGrid:
        turns = self

        class TakingTurns(SiteGrid):
            def _deliver(self, message: Any) -> Any:
                with turns.changed:
                    assert turns.changed.wait_for(lambda: turns.next == run_id, timeout=300), "the other run hung"
                try:
                    return super()._deliver(message)
                finally:
                    with turns.changed:
                        turns.next = 3 - run_id
                        turns.changed.notify_all()

        return TakingTurns([hospital], run_id=run_id, overrides=DP)


def test_two_runs_at_once_share_one_ledger_and_never_pass_the_cap(tmp_path, hospitals):
    # each run alone fits the strict site's cap of 10 (target 8); two whole runs at once do not
    results: dict[int, list[dict[str, Any]]] = {}
    turns = _Turns()

    def one_run(run_id: int) -> None:
        requests = [r for k in (1, 2, 3) for r in (train(k), evaluate(k))]
        results[run_id] = run_attack(turns.grid(hospitals[0], run_id), DP, requests)

    threads = [threading.Thread(target=one_run, args=(run_id,)) for run_id in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    answers = [a for run in results.values() for a in run]
    assert len(answers) == 12
    assert any("PrivacyBudgetExceeded" in a["error"] for a in answers if "error" in a)
    entries = _ledger(tmp_path)
    assert epsilon_spent(entries, 1e-5) <= 10.0
    assert len(entries) == _releases(_answered(answers))  # every answer of either run charged, nothing else
    assert {e.run_id for e in entries} == {1, 2}


def test_a_run_after_one_that_spent_most_of_the_cap_plans_within_what_is_left(tmp_path, hospitals):
    requests = [r for k in (1, 2, 3) for r in (train(k), evaluate(k))]
    first = run_attack(SiteGrid(hospitals[:1], run_id=1, overrides=DP), DP, requests)
    spent = epsilon_spent(_ledger(tmp_path), 1e-5)

    second = run_attack(SiteGrid(hospitals[:1], run_id=2, overrides=DP), DP, requests)

    assert 7.0 < spent <= 8.0  # the first run spent (nearly) its whole target
    assert not [a for a in first + second if "error" in a]  # the second run trained on the 2 left, more noised
    entries = _ledger(tmp_path)
    assert spent < epsilon_spent(entries, 1e-5) <= 10.0
    noise = {e.run_id: e.noise_multiplier for e in entries if e.kind == "train"}
    assert noise[2] > noise[1]
    assert len(entries) == _releases(_answered(first + second))


def test_an_overflowing_model_or_extreme_temperatures_get_no_exact_bit_out(tmp_path, hospitals):
    # a model whose logits overflow to inf/NaN: without care a NaN would pass the noise as an exact signal
    import torch
    from flwr.app import ArrayRecord

    from tests import hostile_coordinator as attack

    state = attack.constant_model(DP)
    last = [k for k in state if k.endswith("weight") and state[k].ndim == 2][-1]
    state[last] = np.full_like(state[last], 3e38)  # every feature times 3e38: inf logits, NaN probabilities
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()})
    grid = SiteGrid(hospitals[:1], run_id=1, overrides=DP)
    requests = [evaluate(1), final(keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: [1e-280, 1.0]}),
                final(keys.STAGE_RELIABILITY, **{keys.TEMPERATURE: 1.0})]
    messages = [grid.create_message(attack.RecordDict({keys.ARRAYS: arrays, keys.CONFIG: attack.ConfigRecord(
        r["config"])}), r["type"], STRICT, "1") for r in requests]

    answers = attack._answers(grid.send_and_receive(messages), grid)

    evaluated, extreme, reliability = answers
    assert all(np.isfinite(v) for k, v in evaluated["metrics"].items() if k.startswith(keys.DP_STAT_PREFIX))
    assert "PolicyRefusal" in extreme["error"] and "out of range" in extreme["error"]  # refused before any charge
    assert all(np.isfinite(v) for k in (keys.RELIABILITY_BEFORE, keys.RELIABILITY_AFTER)
               for v in reliability["metrics"][k])
    assert [e.kind for e in _ledger(tmp_path)] == ["evaluate", "reliability"]
