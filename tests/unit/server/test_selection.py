"""Model selection's corners, each pinned by the mutant of server/tracking/selection.py that survived without it
(`make mutate`): what a chosen round keeps, the edge of the one-standard-error rule, rounds with nothing to choose
on, and the personalised parts' own histories."""

from __future__ import annotations

import math

import pytest

from medfed.server.tracking.rounds import SiteRound
from medfed.server.tracking.selection import select_global, select_parts
from medfed.server.tracking.state import TrackerState


def test_a_chosen_noised_round_keeps_its_validation_and_a_copy_of_its_test_metrics():
    state = TrackerState()
    val, test = {"auc": 0.8, "auc_noise_se": 0.05}, {"auc": 0.77}

    assert select_global(state, 3, val, test)

    assert state.best is not None
    assert (state.best.server_round, state.best.val, state.best.test) == (3, val, {"auc": 0.77})
    test["auc"] = 0.1  # the caller's dict changes later: the record does not
    assert state.best.test == {"auc": 0.77}
    assert select_global(state, 4, {"auc": 0.81, "auc_noise_se": 0.05}, None)
    assert state.best.test is None


def test_a_noised_round_exactly_one_standard_error_below_the_best_still_counts_as_tied():
    state = TrackerState()
    assert select_global(state, 1, {"auc": 0.75, "auc_noise_se": 0.25}, None)

    assert select_global(state, 2, {"auc": 0.5, "auc_noise_se": 0.25}, None)  # 0.75 - 0.25: within, so later wins
    assert not select_global(state, 3, {"auc": 0.4375, "auc_noise_se": 0.25}, None)  # beyond it
    assert state.best is not None and state.best.server_round == 2


def test_an_undefined_noised_auc_leaves_the_best_seen_so_far_alone():
    state = TrackerState()
    assert select_global(state, 1, {"auc": 0.8, "auc_noise_se": 0.05}, None)

    # an AUC the noise left undefined (nan, or None as a resumed checkpoint holds it) with a finite error
    assert select_global(state, 2, {"auc": math.nan, "auc_noise_se": 0.05}, None)
    assert select_global(state, 3, {"auc": None, "auc_noise_se": 0.05}, None)

    assert state.noised_auc_max == 0.8
    assert not select_global(state, 4, {"auc": 0.7, "auc_noise_se": 0.05}, None)  # still judged against 0.8


def test_a_round_with_neither_validation_nor_test_metrics_is_never_chosen():
    state = TrackerState()

    assert not select_global(state, 1, {}, None)
    assert state.best is None
    assert select_global(state, 2, {}, {"auc": 0.9})  # test metrics alone: reported at the latest such round
    assert state.best is not None and state.best.server_round == 2


def _site(n_val: int, **parts: dict[str, dict[str, float]]) -> SiteRound:
    return SiteRound(n_val=n_val, val={"auc": 0.5}, **parts)  # type: ignore[arg-type]


def test_the_ensembles_best_round_is_kept_when_a_later_round_is_worse():
    state = TrackerState()
    select_parts(state, 1, {"a": _site(10, ensemble={"val": {"auc": 0.9}})})

    select_parts(state, 2, {"a": _site(10, ensemble={"val": {"auc": 0.7}})})

    assert state.ensemble_best is not None and state.ensemble_best.server_round == 1
    assert state.ensemble_best.val == {"auc": 0.9}


def test_the_fine_tuned_models_validation_is_weighted_by_each_sites_validation_size():
    state = TrackerState()
    sites = {"a": _site(30, finetuned={"val": {"auc": 0.9}, "test": {"auc": 0.8}}),
             "b": _site(10, finetuned={"val": {"auc": 0.5}}),
             "c": _site(50),  # no fine-tuned model: not part of it
             "d": _site(20, finetuned={"test": {"auc": 0.6}})}  # one without a validation split

    select_parts(state, 5, sites)

    assert state.finetuned is not None and state.finetuned.server_round == 5
    assert state.finetuned.val == {"auc": pytest.approx((30 * 0.9 + 10 * 0.5) / 40)}
    assert set(state.finetuned.sites) == {"a", "b", "d"}


def test_a_personalised_part_reported_without_validation_metrics_is_still_recorded():
    state = TrackerState()

    select_parts(state, 1, {"a": _site(10, personal={"test": {"auc": 0.8}})})

    assert state.personal_best is not None and state.personal_best.val == {}
    assert state.personal_best.sites == {"a": {"test": {"auc": 0.8}}}
