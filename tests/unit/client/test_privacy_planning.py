"""The privacy planning's arithmetic, case by case: the site's cap from its node config, sampling, the run plans a
site tries, the least noise that fits, a release's cost, and the exact words of each refusal. Each test pins a
change to client/privacy.py that the behavioural tests in test_privacy.py let through (`make mutate`).

Expected noise levels are checked by what they spend (``epsilon_spent``, itself checked against dp-accounting in
test_privacy.py): the least noise that fits spends at most the target, and 0.2 % less noise spends more."""

from __future__ import annotations

import logging
import math

import pytest
from opacus.accountants import RDPAccountant

from medfed.client.ledger import LedgerEntry
from medfed.client.privacy import (
    SiteCap,
    SitOut,
    _candidates,
    _node_bool,
    _node_float,
    _noise_for,
    epsilon_spent,
    plan_release,
    plan_round,
    release_noise_for,
    sampling,
    site_cap,
)
from medfed.common import keys
from medfed.common.noise_search import least_noise as _least_noise
from medfed.common.noise_search import secant as _secant
from medfed.common.config import DPConfig, FederationConfig
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded


def _entry(sigma: float, q: float, steps: int, run_id: int = 1, kind: str = "train") -> LedgerEntry:
    return LedgerEntry.new(run_id, 1, sigma, q, steps, kind)


# --- the site's cap from its node config -----------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "value"), [(2, 2.0), (2.5, 2.5), ("2.5", 2.5), (" 3 ", 3.0), (1.0, 1.0), (4.0, 4.0)])
def test_a_node_number_is_read_from_ints_floats_and_text_within_its_closed_range(raw, value):
    assert _node_float({"k": raw}, "k", 9.0, 1.0, 4.0) == value
    assert _node_float({}, "k", 9.0, 1.0, 4.0) == 9.0  # absent: the default, unchecked


@pytest.mark.parametrize(("raw", "why"), [
    ([1], "is not a number"), (None, "is not a number"), ("lots", "is not a number"),
    (0.999, "is out of range; it must lie in [1.0, 4.0]"), (4.001, "is out of range; it must lie in [1.0, 4.0]"),
    ("nan", "is out of range; it must lie in [1.0, 4.0]"),
])
def test_a_bad_node_number_names_the_key_the_value_and_what_is_allowed(raw, why):
    with pytest.raises(ConfigError) as bad:
        _node_float({"k": raw}, "k", 2.0, 1.0, 4.0)
    assert str(bad.value).startswith(f"Node config k={raw!r} {why}")
    if why == "is not a number":
        assert str(bad.value) == f"Node config k={raw!r} is not a number; set it in the site config."


@pytest.mark.parametrize(("raw", "value"), [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), ("true", True), (" Yes ", True), ("1", True),
    ("FALSE", False), ("no", False), ("0", False),
])
def test_a_node_switch_reads_booleans_zero_one_and_yes_no_text(raw, value):
    assert _node_bool({"k": raw}, "k") is value
    assert _node_bool({}, "k") is False


@pytest.mark.parametrize("raw", [2, 0.5, "maybe", None, [True]])
def test_a_bad_node_switch_is_a_clear_error(raw):
    with pytest.raises(ConfigError) as bad:
        _node_bool({"k": raw}, "k")
    assert str(bad.value) == f"Node config k={raw!r} is not true or false; set it in the site config."


def test_each_node_key_sets_its_own_part_of_the_cap_and_the_federation_fills_the_rest():
    federation = FederationConfig(hospitals=2, site_max_epsilon=7.0, site_max_epsilon_each=[], site_max_delta=1e-6,
                                  site_min_noise=0.3)

    assert site_cap(federation, {}, 0) == SiteCap(7.0, 1e-6, 0.3, False)
    assert site_cap(federation, {keys.NODE_MAX_DELTA: 1e-7}, 0) == SiteCap(7.0, 1e-7, 0.3, False)
    assert site_cap(federation, {keys.NODE_MIN_NOISE: 0.9}, 0) == SiteCap(7.0, 1e-6, 0.9, False)
    assert site_cap(federation, {keys.NODE_SECURE_RNG: "true"}, 0) == SiteCap(7.0, 1e-6, 0.3, True)
    each = FederationConfig(hospitals=2, site_max_epsilon=7.0, site_max_epsilon_each=[1.0, 2.0])
    assert site_cap(each, {}, None).max_epsilon == 7.0  # a deployed node has no simulation index
    assert site_cap(each, {}, 0).max_epsilon == 1.0
    # the node config's bounds: a cap above 0, a delta below 1, no negative noise
    assert site_cap(federation, {keys.NODE_MAX_EPSILON: 1e-9, keys.NODE_MAX_DELTA: 0.999999,
                                 keys.NODE_MIN_NOISE: 0.0}, 0) == SiteCap(1e-9, 0.999999, 0.0, False)
    for key, bad in ((keys.NODE_MAX_EPSILON, 0.0), (keys.NODE_MAX_DELTA, 1.0), (keys.NODE_MIN_NOISE, -0.1),
                     (keys.NODE_MIN_NOISE, 1e4 + 1)):
        with pytest.raises(ConfigError, match=f"Node config {key}="):
            site_cap(federation, {key: bad}, 0)


# --- sampling and run plans ------------------------------------------------------------------------------------
def test_sampling_is_one_over_the_batches_per_epoch_and_their_steps():
    assert sampling(100, 20, 2) == (0.2, 10)
    assert sampling(101, 20, 3) == (1 / 6, 18)  # a last, smaller batch counts
    assert sampling(4, 8, 1) == (1.0, 1)


def test_the_plans_a_site_tries_go_from_the_recipe_to_ever_rarer_full_batch_steps():
    assert _candidates(100, 20, 3, 4) == [(20, 3, 1), (100, 3, 1), (100, 1, 1), (100, 1, 2), (100, 1, 3),
                                          (100, 1, 4)]
    assert _candidates(10, 32, 1, 2) == [(32, 1, 1), (32, 1, 2)]  # already full-batch, one epoch
    assert _candidates(10, 10, 2, 0) == [(10, 2, 1), (10, 1, 1)]  # no rounds left: no sitting out


# --- the least noise that fits -----------------------------------------------------------------------------------
def _least(noise: float, spend) -> None:
    assert spend(noise) and not spend(noise * 0.998)


def test_the_noise_for_a_target_is_the_least_that_fits_over_what_was_spent():
    prior = [_entry(2.0, 0.1, 30)]

    noise = _noise_for(3.0, 1e-5, 0.1, 50, prior, 10.0)

    _least(noise, lambda s: epsilon_spent([*prior, _entry(s, 0.1, 50)], 1e-5) <= 3.0)
    assert _noise_for(3.0, 1e-5, 0.1, 50, prior, noise * 0.99) == math.inf  # the ceiling does not fit
    assert _noise_for(3.0, 1e-5, 0.1, 50, prior, noise) == noise  # exactly the ceiling fits


class _Looks:
    """An epsilon curve that counts how often it is read (each read of Opacus' RDP costs ~0.3 s)."""

    def __init__(self, curve):
        self.curve, self.xs = curve, []

    def __call__(self, sigma: float) -> float:
        self.xs.append(sigma)
        return self.curve(sigma)


@pytest.mark.parametrize(("curve", "target", "ceiling", "most_looks"), [
    (lambda s: 2.0 / s, 0.8, 10.0, 4),  # epsilon of Gaussian releases falls about as 1 / noise
    (lambda s: 0.3 / s**2 + 1.0 / s, 0.8, 10.0, 6),  # and faster where the noise is small
    (lambda s: math.inf if s < 0.5 else 1.0 / (s - 0.45), 0.8, 10.0, 7),  # overflow below some noise, steep above
    (lambda s: 0.5 / s + 0.5 / s**3, 0.3, 10.0, 6),  # its last look falls short: it steps up across the answer
    (lambda s: 2e3 / s + 1e5 / s**2, 0.8, 1e4, 4),  # the same steps at a thousand times the scale
])
def test_the_least_noise_is_found_to_a_thousandth_in_a_few_looks(curve, target, ceiling, most_looks):
    eps = _Looks(curve)

    noise = _least_noise(eps, target, ceiling)

    _least(noise, lambda s: curve(s) <= target)
    assert noise in eps.xs and noise * 0.999 <= max(x for x in eps.xs if curve(x) > target)  # a look on each side
    assert len(eps.xs) <= most_looks  # halving from [0, ceiling] takes 14 or more


def test_a_curve_the_secant_cannot_read_is_halved_to_a_thousandth():
    eps = _Looks(lambda s: 5.0 if s < 1.2345 else 0.0)  # a step: no slope to follow

    noise = _least_noise(eps, 1.0, 10.0)

    assert 1.2345 <= noise <= 1.2345 * 1.001
    assert len(eps.xs) <= 15


def test_the_least_noise_is_the_ceiling_when_only_it_fits_and_inf_when_not_even_it_does():
    assert _least_noise(lambda s: 1.0 / s, 0.5, 2.0) == 2.0
    assert _least_noise(lambda s: 1.0 / s, 0.5, 1.99) == math.inf
    eps = _Looks(lambda s: 1.0 / s)
    assert _least_noise(eps, 0.5, 1.99) == math.inf and eps.xs == [1.99]  # one look says so


def test_the_search_never_looks_far_below_the_least_noise_seen_to_fit():
    eps = _Looks(lambda s: 1e-9 / s)  # the 1 / noise guess says 1e-8: RDP's arithmetic divides by noise squared

    noise = _least_noise(eps, 1.0, 10.0)

    assert noise == pytest.approx(1e-9, rel=1e-3)
    assert all(later >= earlier / 64 for earlier, later in zip(eps.xs, eps.xs[1:]))


def test_the_secant_goes_through_two_looks_in_log_space_and_says_nothing_where_it_cannot():
    assert _secant((1.0, 4.0), (2.0, 1.0), 0.25) == pytest.approx(4.0)  # epsilon = 4 / noise^2
    assert _secant((2.0, 1.0), (1.0, 4.0), 0.25) == pytest.approx(4.0)  # either order
    for a, b in [((1.0, math.inf), (2.0, 1.0)), ((1.0, 4.0), (2.0, 0.0)), ((1.0, 0.0), (2.0, 1.0)),
                 ((1.0, 4.0), (2.0, math.inf)), ((2.0, 4.0), (2.0, 1.0)), ((1.0, 1.0), (2.0, 4.0)),
                 ((1.0, 1.0), (2.0, 1.0))]:
        assert math.isnan(_secant(a, b, 0.25)), (a, b)


@pytest.mark.parametrize("releases", [1, 4])
def test_the_noise_for_noised_releases_is_the_least_that_fits(releases):
    noise = release_noise_for(0.5, 1e-5, releases)

    _least(noise, lambda s: epsilon_spent([_entry(s, 1.0, releases)], 1e-5) <= 0.5)
    assert release_noise_for(0.5, 1e-5, 0) == release_noise_for(0.5, 1e-5, 1)  # at least one release
    assert release_noise_for(1e-9, 1e-5, 1) == 1e4  # out of reach: the largest noise medfed plans


def test_entries_of_the_same_noise_and_rate_compose_as_one_with_their_steps_added():
    assert epsilon_spent([_entry(1.1, 0.1, 7), _entry(1.1, 0.1, 5), _entry(2.0, 1.0, 1)], 1e-5) == epsilon_spent(
        [_entry(1.1, 0.1, 12), _entry(2.0, 1.0, 1)], 1e-5)
    assert epsilon_spent([_entry(1.1, 0.1, 7), _entry(1.1, 0.1, 5)], 1e-5) > epsilon_spent([_entry(1.1, 0.1, 7)], 1e-5)
    opacus = RDPAccountant()  # Opacus' own accountant, fed the same steps one by one
    opacus.history = [(1.1, 0.1, 12), (2.0, 1.0, 1)]
    assert epsilon_spent([_entry(1.1, 0.1, 7), _entry(1.1, 0.1, 5), _entry(2.0, 1.0, 1)], 1e-5) == pytest.approx(
        opacus.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_counts_only_entries_that_took_steps():
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent([_entry(0.0, 1.0, 0)], 1e-5) == 0.0  # a plan that took no step spent nothing
    assert epsilon_spent([_entry(0.0, 1.0, 1)], 1e-5) == math.inf  # no noise: no bound
    assert epsilon_spent([_entry(-1.0, 1.0, 1)], 1e-5) == math.inf  # nor with a negative one


# --- one noised release ----------------------------------------------------------------------------------------
def test_a_release_costs_one_full_batch_gaussian_step_and_is_refused_past_the_cap():
    spent = [_entry(1.0, 0.1, 20)]
    before = epsilon_spent(spent, 1e-5)
    after = epsilon_spent([*spent, _entry(0.5, 1.0, 1)], 1e-5)

    assert plan_release(spent, noise_multiplier=0.5, delta=1e-5, cap=SiteCap(),
                        what="evaluation") == (before, after)
    assert plan_release(spent, noise_multiplier=0.5, delta=1e-5, cap=SiteCap(max_epsilon=after),
                        what="evaluation") == (before, after)  # exactly at the cap: still within it
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_release(spent, noise_multiplier=0.5, delta=1e-5, cap=SiteCap(max_epsilon=after * 0.999),
                     what="evaluation")
    assert str(refused.value) == (
        f"Privacy cap reached: answering the evaluation (noise multiplier 0.5) would raise the hospital's epsilon "
        f"from {before:.3g} to {after:.3g} (delta 1e-05), above its cap {after * 0.999:g}; it does not answer. To "
        "answer more, the hospital must raise its own cap.")


@pytest.mark.parametrize("noise", [0.0, -1.0])
def test_a_release_without_noise_is_refused(noise):
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_release([], noise_multiplier=noise, delta=1e-5, cap=SiteCap(), what="calibration")
    assert str(refused.value) == (f"The calibration asks for noise multiplier {noise!r}; a noised release needs one "
                                  "> 0, so this hospital does not answer.")


# --- a round's plan ------------------------------------------------------------------------------------------------
def test_a_plan_that_keeps_the_recipe_says_so_and_reports_what_was_spent_before():
    spent = [_entry(3.0, 0.5, 4, run_id=9)]
    dp = DPConfig(target_epsilon=4.0)

    plan = plan_round(dp, SiteCap(), n_train=100, batch_size=20, local_epochs=2, rounds_left=3, entries=spent,
                      run_id=1, server_round=1)

    assert (plan.batch_size, plan.local_epochs, plan.period, plan.sample_rate, plan.steps) == (20, 2, 1, 0.2, 10)
    assert not plan.adapted and plan.cap == SiteCap() and plan.delta == 1e-5
    assert plan.epsilon_before == epsilon_spent(spent, 1e-5)
    assert plan.epsilon_after == epsilon_spent([*spent, _entry(plan.noise_multiplier, 0.2, 10)], 1e-5)
    # the run's three rounds spend the run's target, whatever other runs spent
    _least(plan.noise_multiplier, lambda s: epsilon_spent([_entry(s, 0.2, 30)], 1e-5) <= 4.0)


def test_the_sites_cap_raises_the_noise_over_everything_spent_and_to_come():
    spent = [_entry(3.0, 0.2, 10, run_id=9)]
    reserved = [_entry(5.0, 1.0, 2, run_id=1, kind="evaluate")]
    dp, cap = DPConfig(target_epsilon=8.0), SiteCap(max_epsilon=2.0)

    plan = plan_round(dp, cap, n_train=100, batch_size=20, local_epochs=1, rounds_left=4, entries=spent, run_id=1,
                      reserved=reserved, server_round=1)

    _least(plan.noise_multiplier, lambda s: epsilon_spent([*spent, *reserved, _entry(s, 0.2, 20)], 1e-5) <= 2.0)


def test_the_runs_target_counts_this_runs_noised_evaluations_and_nothing_of_other_runs():
    mine = _entry(4.0, 1.0, 1, run_id=1, kind="evaluate")
    others = [_entry(4.0, 1.0, 1, run_id=2, kind="evaluate"), _entry(1.0, 0.5, 4, run_id=2)]

    plan = plan_round(DPConfig(target_epsilon=3.0), SiteCap(), n_train=100, batch_size=20, local_epochs=1,
                      rounds_left=3, entries=[mine, *others], run_id=1, server_round=1)

    _least(plan.noise_multiplier, lambda s: epsilon_spent([mine, _entry(s, 0.2, 15)], 1e-5) <= 3.0)


def test_a_cap_too_tight_for_one_more_round_with_its_evaluations_says_how_far_it_would_go():
    # the run's plan was fixed in its first round; since then the cap has been lowered
    spent = [LedgerEntry.new(1, 1, 1.0, 0.2, 5, batch_size=20, local_epochs=1)]
    this_round = epsilon_spent([*spent, _entry(1.0, 0.2, 5)], 1e-5)
    reserved = [_entry(0.6, 1.0, 1, run_id=1, kind="evaluate")]
    before = epsilon_spent(spent, 1e-5)
    dp, cap = DPConfig(target_epsilon=8.0), SiteCap(max_epsilon=this_round + 0.01)
    assert plan_round(dp, cap, n_train=100, batch_size=20, local_epochs=1, rounds_left=3, entries=spent, run_id=1,
                      server_round=2).epsilon_after == this_round  # the round alone fits
    assert plan_round(dp, SiteCap(max_epsilon=this_round), n_train=100, batch_size=20, local_epochs=1, rounds_left=3,
                      entries=spent, run_id=1, server_round=2).epsilon_after == this_round  # exactly the cap: within
    with pytest.raises(PrivacyBudgetExceeded) as alone:  # a cap below even the round alone
        plan_round(dp, SiteCap(max_epsilon=this_round - 0.01), n_train=100, batch_size=20, local_epochs=1,
                   rounds_left=3, entries=spent, run_id=1, server_round=2)
    assert str(alone.value) == (
        f"Privacy cap reached: this round would raise the hospital's epsilon from {before:.3g} to {this_round:.3g} "
        f"(delta 1e-05), above its cap {this_round - 0.01:g}; it does not train. The run goes on without it. To "
        "train more, the hospital must raise its own cap (max-epsilon).")

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_round(dp, cap, n_train=100, batch_size=20, local_epochs=1, rounds_left=3, entries=spent, run_id=1,
                   reserved=reserved, server_round=2)

    text = str(refused.value)
    assert text.startswith(f"Privacy cap reached: this round and the run's 1 noised evaluations still to come would "
                           f"raise the hospital's epsilon from {before:.3g} to ")
    assert text.endswith(f"(delta 1e-05), above its cap {this_round + 0.01:g}; it does not train. The run goes on "
                         "without it. To train more, the hospital must raise its own cap (max-epsilon).")


def test_a_cap_already_spent_refuses_with_the_ceiling_and_both_ways_to_go_on():
    spent = [_entry(0.7, 1.0, 30, run_id=9)]
    before = epsilon_spent(spent, 1e-5)

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_round(DPConfig(), SiteCap(max_epsilon=before + 1e-6), n_train=64, batch_size=32, local_epochs=1,
                   rounds_left=2, entries=spent, run_id=1, server_round=1)

    assert str(refused.value) == (
        f"Privacy cap reached: the hospital has spent epsilon {before:.3g} of its cap {before + 1e-6:g} (delta "
        "1e-05); even one full-batch step more in this run, with its noised evaluations, would need a noise "
        "multiplier above privacy.max_noise_multiplier=10, so it does not train. The run goes on without it. To "
        "train more, the hospital must raise its own cap (max-epsilon), or the coordinator may plan a larger "
        "target_epsilon.")


@pytest.mark.parametrize("rounds_left", [20, 1])
def test_a_target_out_of_reach_names_the_target_the_rounds_and_the_ceiling(rounds_left):
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_round(DPConfig(target_epsilon=0.01, max_noise_multiplier=3.0), SiteCap(), n_train=13, batch_size=128,
                   local_epochs=1, rounds_left=rounds_left, entries=[], run_id=1, server_round=1)

    assert str(refused.value) == (
        "Privacy target out of reach for this hospital: spending at most target_epsilon 0.01 (delta 1e-05) even "
        f"with one full-batch step in the run's {rounds_left} remaining rounds would need a noise multiplier above "
        "privacy.max_noise_multiplier=3, so it does not train this round (it tries again next round). Raise "
        "privacy.target_epsilon or privacy.max_noise_multiplier.")


def test_a_sites_min_noise_above_the_ceiling_raises_the_ceiling_instead_of_refusing():
    plan = plan_round(DPConfig(target_epsilon=50.0, max_noise_multiplier=2.0), SiteCap(min_noise=12.0), n_train=64,
                      batch_size=32, local_epochs=1, rounds_left=2, entries=[], run_id=1, server_round=1)

    assert plan.noise_multiplier == 12.0 and not plan.adapted


def test_later_rounds_follow_the_runs_plan_even_from_an_older_ledger_without_batch_or_epochs():
    # an entry written before the plan's batch size and epochs were recorded (0: derived from rate and steps)
    first = LedgerEntry(id="old", run_id=1, server_round=1, noise_multiplier=1.7, sample_rate=0.25, steps=8,
                        recorded_at=0.0)
    later = LedgerEntry.new(1, 2, 1.7, 0.25, 8)

    plan = plan_round(DPConfig(), SiteCap(), n_train=40, batch_size=10, local_epochs=2, rounds_left=2,
                      entries=[first, later], run_id=1, server_round=3)

    assert (plan.noise_multiplier, plan.sample_rate, plan.steps, plan.batch_size, plan.local_epochs) == (
        1.7, 0.25, 8, 10, 2)
    assert isinstance(plan.local_epochs, int) and isinstance(plan.batch_size, int)  # they size the training loop
    assert plan.epsilon_before == epsilon_spent([first, later], 1e-5)
    # an evaluation of this run, or an entry of another run, never fixes the run's plan
    other = [_entry(4.0, 1.0, 1, run_id=1, kind="evaluate"), _entry(2.5, 0.5, 2, run_id=2)]
    fresh = plan_round(DPConfig(), SiteCap(), n_train=40, batch_size=10, local_epochs=2, rounds_left=2,
                       entries=other, run_id=1, server_round=1)
    assert fresh.noise_multiplier not in (4.0, 2.5) and fresh.sample_rate == 0.25
    # nor does a training entry of this run that took no step (medfed writes none; it would cost nothing)
    zero = LedgerEntry.new(1, 1, 4.0, 0.5, 0)
    assert plan_round(DPConfig(), SiteCap(), n_train=40, batch_size=10, local_epochs=2, rounds_left=2,
                      entries=[zero], run_id=1, server_round=2) == plan_round(
        DPConfig(), SiteCap(), n_train=40, batch_size=10, local_epochs=2, rounds_left=2, entries=[], run_id=1,
        server_round=1)


def test_an_older_ledgers_full_batch_single_epoch_plan_is_read_back_as_such():
    first = LedgerEntry(id="old", run_id=1, server_round=1, noise_multiplier=2.0, sample_rate=1.0, steps=1,
                        recorded_at=0.0)  # no batch size or epochs recorded: one batch of all 40 images, one epoch

    plan = plan_round(DPConfig(), SiteCap(), n_train=40, batch_size=64, local_epochs=1, rounds_left=2,
                      entries=[first], run_id=1, server_round=2)

    assert (plan.noise_multiplier, plan.sample_rate, plan.steps, plan.batch_size, plan.local_epochs) == (
        2.0, 1.0, 1, 40, 1)


def test_the_site_log_names_an_adapted_plan_and_only_an_adapted_one(caplog):
    def eps(steps: int) -> float:  # full-batch steps at the ceiling's noise
        return epsilon_spent([_entry(2.0, 1.0, steps)], 1e-5)

    def adapted(target: float, epochs: int, rounds: int) -> list[str]:
        caplog.clear()
        try:
            plan_round(DPConfig(target_epsilon=target, max_noise_multiplier=2.0), SiteCap(), n_train=10,
                       batch_size=32, local_epochs=epochs, rounds_left=rounds, entries=[], run_id=1, server_round=1)
        except PrivacyBudgetExceeded:
            pass
        return [r.getMessage().rpartition(",")[0] for r in caplog.records if "adapted" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="medfed.client.privacy")
    assert adapted(eps(3) * 1.01, 3, 1) == []  # the recipe's 3 full-batch steps fit in the one round left
    assert adapted((eps(1) + eps(3)) / 2, 3, 1) == [  # one step fits, three do not
        "run plan adapted to fit the privacy budget: batch 32, 1 epoch(s) per round, every 1 round(s)"]
    assert adapted((eps(1) + eps(2)) / 2, 1, 2) == [  # a step in each of 2 rounds does not fit, in one of them does
        "run plan adapted to fit the privacy budget: batch 32, 1 epoch(s) per round, every 2 round(s)"]
    assert adapted(eps(1) / 2, 1, 1) == []  # refused: no plan, none logged


def test_a_site_that_trains_every_third_round_sits_out_the_two_between():
    first = LedgerEntry.new(1, 2, 9.0, 1.0, 1, period=3, batch_size=4, local_epochs=1)

    for server_round, trains in ((3, False), (4, False), (5, True), (8, True)):
        if trains:
            assert plan_round(DPConfig(), SiteCap(), n_train=4, batch_size=2, local_epochs=3, rounds_left=3,
                              entries=[first], run_id=1, server_round=server_round).period == 3
        else:
            with pytest.raises(SitOut) as sat:
                plan_round(DPConfig(), SiteCap(), n_train=4, batch_size=2, local_epochs=3, rounds_left=3,
                           entries=[first], run_id=1, server_round=server_round)
            assert str(sat.value) == ("This hospital trains every 3 rounds of this run to fit its privacy budget "
                                      "(planned at its first round); it sits this round out.")


def test_an_accountant_overflow_counts_as_spent_beyond_any_cap(monkeypatch):
    from opacus.accountants.analysis import rdp

    monkeypatch.setattr(rdp, "get_privacy_spent", lambda **_: (math.nan, 10.0))  # what Opacus gives on overflow

    assert epsilon_spent([_entry(1.0, 0.5, 10)], 1e-5) == math.inf  # never "fits"


def test_a_training_split_that_changed_size_is_refused_in_words_that_say_what_to_do():
    first = LedgerEntry.new(1, 1, 2.0, 0.1, 10, batch_size=10, local_epochs=1)

    with pytest.raises(PrivacyBudgetExceeded) as refused:
        plan_round(DPConfig(), SiteCap(), n_train=5, batch_size=10, local_epochs=1, rounds_left=3, entries=[first],
                   run_id=1, server_round=2)

    assert str(refused.value) == (
        "This hospital's training split changed size during this run, so the run's privacy plan (its sampling rate "
        "and steps) no longer holds; it does not train again in this run. A new run plans afresh.")
