"""Differential privacy at a hospital: accounting, the persistent ledger, the site's cap, DP-SGD itself."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from medfed.client.app import SiteFailure, app
from medfed.client.ledger import LedgerEntry, PrivacyLedger
from medfed.client.privacy import (
    SiteCap,
    SitOut,
    epsilon_spent,
    plan_round,
    sampling,
    secure_rng_problem,
    site_cap,
)
from medfed.client.training import DPTraining, train_epochs
from medfed.common import keys
from medfed.common.config import DPConfig, FederationConfig, ModelConfig, TrainConfig, compose_config
from medfed.common.config import run_config_from_overrides
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded
from medfed.common.models import available_models, build_model, require_dp_compatible
from tests.conftest import instruction

HAS_CSPRNG = importlib.util.find_spec("torchcsprng") is not None  # no wheel for this torch (CI lacks it)

DP = ["privacy=dp", "privacy.target_epsilon=4", "dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3",
      "train.rounds=3"]


def _entry(sigma: float, q: float, steps: int, run_id: int = 1) -> LedgerEntry:
    return LedgerEntry.new(run_id, 1, sigma, q, steps)


# --- accounting ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    # golden values from Opacus' RDP accountant (opacus 1.6.0), recorded once by hand
    [(1.0, 0.01, 1000, 2.1014), (1.1, 0.05, 300, 5.3685), (4.0, 1.0, 10, 3.6171)],
)
def test_epsilon_matches_opacus_rdp_accountant(sigma: float, q: float, steps: int, expected: float) -> None:
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]

    assert epsilon_spent([_entry(sigma, q, steps)], 1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    assert epsilon_spent([_entry(sigma, q, steps)], 1e-5) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (1.1, 0.05, 300), (4.0, 1.0, 10)])
def test_epsilon_agrees_with_a_second_accountant(sigma: float, q: float, steps: int) -> None:
    # an implementation independent of Opacus: Google's dp-accounting (a dependency already), its RDP accountant
    # at the same orders, and its PLD accountant, which is tighter, so never above the RDP figure
    import dp_accounting
    from dp_accounting import rdp
    from dp_accounting.pld import pld_privacy_accountant
    from opacus.accountants import RDPAccountant

    step = dp_accounting.GaussianDpEvent(sigma)
    event = dp_accounting.SelfComposedDpEvent(step if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, step), steps)
    second = rdp.RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)
    second.compose(event)
    tighter = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    tighter.compose(event)

    ours = epsilon_spent([_entry(sigma, q, steps)], 1e-5)
    assert ours == pytest.approx(second.get_epsilon(1e-5), rel=1e-3)
    assert tighter.get_epsilon(1e-5) <= ours


def test_epsilon_composes_across_entries_and_runs() -> None:
    one = epsilon_spent([_entry(1.0, 0.1, 50, run_id=1)], 1e-5)
    two = epsilon_spent([_entry(1.0, 0.1, 50, run_id=1), _entry(1.0, 0.1, 50, run_id=2)], 1e-5)
    same_as_one_long = epsilon_spent([_entry(1.0, 0.1, 100)], 1e-5)

    assert 0 < one < two
    assert two == pytest.approx(same_as_one_long)


def test_noise_is_derived_from_the_target_over_the_planned_rounds() -> None:
    dp = DPConfig(target_epsilon=3.0)
    plan = plan_round(dp, SiteCap(), n_train=100, batch_size=20, local_epochs=2, rounds_left=5,
                      entries=[], run_id=1, server_round=1)
    q, steps = sampling(100, 20, 2)

    whole_run = epsilon_spent([_entry(plan.noise_multiplier, q, steps * 5)], dp.delta)
    assert (plan.sample_rate, plan.steps) == (q, steps) == (0.2, 10)
    assert whole_run <= 3.0
    assert whole_run > 2.9  # the least noise that fits, not an arbitrary large one
    assert plan.epsilon_before == 0.0 and 0 < plan.epsilon_after < whole_run


def test_site_cap_is_stricter_never_looser() -> None:
    federation = FederationConfig(hospitals=2, site_max_epsilon=2.0, site_max_epsilon_each=[], site_max_delta=1e-6)
    cap = site_cap(federation, {}, 0)
    dp = DPConfig(target_epsilon=8.0, delta=1e-5)

    plan = plan_round(dp, cap, n_train=100, batch_size=20, local_epochs=1, rounds_left=4,
                      entries=[], run_id=1, server_round=1)
    loose = plan_round(dp, SiteCap(), n_train=100, batch_size=20, local_epochs=1, rounds_left=4,
                       entries=[], run_id=1, server_round=1)

    assert plan.delta == 1e-6  # the site's delta, smaller than the request
    assert plan.noise_multiplier > loose.noise_multiplier
    q, steps = sampling(100, 20, 1)
    assert epsilon_spent([_entry(plan.noise_multiplier, q, 4 * steps)], 1e-6) <= 2.0


def test_the_stricter_delta_wins_from_either_side() -> None:
    # a coordinator asking a looser delta than the site allows gets the site's; one asking a stricter delta gets
    # its own (issue 28: taking the site's delta as-is went unnoticed)
    for asked, allowed, expected in ((1e-3, 1e-5, 1e-5), (1e-7, 1e-5, 1e-7)):
        plan = plan_round(DPConfig(target_epsilon=8.0, delta=asked), SiteCap(max_delta=allowed), n_train=100,
                          batch_size=20, local_epochs=1, rounds_left=4, entries=[], run_id=1, server_round=1)
        assert plan.delta == expected, (asked, allowed)


def test_node_config_cap_wins_over_simulation_defaults_and_bad_values_are_clear() -> None:
    federation = FederationConfig(hospitals=2, site_max_epsilon_each=[5.0, 6.0])

    assert site_cap(federation, {}, 1).max_epsilon == 6.0
    assert site_cap(federation, {keys.NODE_MAX_EPSILON: 1.5, keys.NODE_MIN_NOISE: 0.8}, 1) == SiteCap(1.5, 1e-5, 0.8)
    with pytest.raises(ConfigError, match="max-epsilon='lots'"):
        site_cap(federation, {keys.NODE_MAX_EPSILON: "lots"}, 0)


def test_min_noise_of_the_site_is_respected() -> None:
    plan = plan_round(DPConfig(target_epsilon=50.0), SiteCap(min_noise=2.5), n_train=64, batch_size=32,
                      local_epochs=1, rounds_left=2, entries=[], run_id=1, server_round=1)
    assert plan.noise_multiplier == 2.5


def test_a_site_that_cannot_reach_the_target_even_with_one_step_says_so(caplog) -> None:
    with pytest.raises(PrivacyBudgetExceeded, match="target out of reach") as refused:
        plan_round(DPConfig(target_epsilon=0.01), SiteCap(), n_train=13, batch_size=128, local_epochs=1,
                   rounds_left=20, entries=[], run_id=1, server_round=1)

    # the forwarded reason names no number that follows the data's size; the site's own log does
    assert "13" not in str(refused.value) and "sampling rate" not in str(refused.value)
    assert "13 training images" in caplog.text


def test_a_4_image_site_with_cap_1_plans_fewer_full_batch_steps_spends_at_most_1_and_trains() -> None:
    # Prepare: the recipe (batch 2, 3 local epochs, 10 rounds) would need noise far above the ceiling at epsilon 1
    dp, cap = DPConfig(target_epsilon=8.0, max_noise_multiplier=10.0), SiteCap(max_epsilon=1.0)
    rate, steps = sampling(4, 2, 3)
    assert epsilon_spent([LedgerEntry("recipe", 1, 0, 10.0, rate, steps * 10, 0.0)], 1e-5) > 1.0

    # Execute: the site plans its whole run and trains every round its plan keeps
    plan = plan_round(dp, cap, n_train=4, batch_size=2, local_epochs=3, rounds_left=10,
                      entries=[], run_id=1, server_round=1)
    entries, trained = [], 0
    for server_round in range(1, 11):
        try:
            planned = plan_round(dp, cap, n_train=4, batch_size=2, local_epochs=3, rounds_left=11 - server_round,
                                 entries=entries, run_id=1, server_round=server_round)
        except SitOut:
            continue
        entries.append(LedgerEntry.new(1, server_round, planned.noise_multiplier, planned.sample_rate, planned.steps,
                                       period=planned.period))
        trained += 1

    # Assert: full-batch steps (sampling rate 1), one per round it trains, within the ceiling and the cap
    assert plan.sample_rate == 1.0 and plan.batch_size == 4 and plan.local_epochs == 1 and plan.adapted
    assert plan.noise_multiplier <= 10.0
    assert trained == math.ceil(10 / plan.period) >= 1
    assert epsilon_spent(entries, 1e-5) <= 1.0


def test_a_site_that_sits_out_says_so_in_a_refusal_the_coordinator_tells_from_a_failure() -> None:
    # Prepare: a plan that trains every 2nd round (recorded at round 1)
    first = LedgerEntry.new(1, 1, 9.0, 1.0, 1, period=2, batch_size=4, local_epochs=1)

    # Execute / Assert: round 2 sits out, round 3 trains with the recorded plan
    with pytest.raises(SitOut) as sat:
        plan_round(DPConfig(), SiteCap(), n_train=4, batch_size=2, local_epochs=3, rounds_left=9, entries=[first],
                   run_id=1, server_round=2)
    assert keys.site_refusal(f"SitOut: {sat.value}") is keys.SiteRefusal.SIT_OUT
    plan = plan_round(DPConfig(), SiteCap(), n_train=4, batch_size=2, local_epochs=3, rounds_left=8, entries=[first],
                      run_id=1, server_round=3)
    assert (plan.batch_size, plan.local_epochs, plan.period, plan.noise_multiplier) == (4, 1, 2, 9.0)


def test_a_training_split_that_changes_size_during_the_run_stops_training_in_that_run() -> None:
    first = LedgerEntry.new(1, 1, 2.0, 0.1, 10, batch_size=10, local_epochs=1)  # planned for 100 images

    with pytest.raises(PrivacyBudgetExceeded, match="changed size during this run"):
        plan_round(DPConfig(), SiteCap(), n_train=5, batch_size=10, local_epochs=1, rounds_left=3, entries=[first],
                   run_id=1, server_round=2)
    same = plan_round(DPConfig(), SiteCap(), n_train=100, batch_size=10, local_epochs=1, rounds_left=3,
                      entries=[first], run_id=1, server_round=2)
    assert (same.sample_rate, same.steps) == (0.1, 10)


def test_a_round_past_the_cap_is_refused_with_a_phi_free_reason() -> None:
    spent = [_entry(0.8, 0.5, 40, run_id=7)]
    before = epsilon_spent(spent, 1e-5)

    with pytest.raises(PrivacyBudgetExceeded) as info:
        plan_round(DPConfig(), SiteCap(max_epsilon=before + 0.01), n_train=64, batch_size=32, local_epochs=1,
                   rounds_left=1, entries=spent, run_id=7, server_round=1)

    text = str(info.value)
    assert "cap" in text and f"{before:.3g}" in text and "does not train" in text
    assert "/" not in text  # no paths


# --- the ledger ------------------------------------------------------------------------------------------------
def test_fingerprint_follows_the_data_and_is_forgotten_with_its_site() -> None:
    import gc

    from medfed.client import ledger as privacy
    from medfed.client.ledger import dataset_fingerprint
    from medfed.common.data import SiteData
    from medfed.common.data.arrays import DatasetInfo

    def site(data: ArrayDataset) -> SiteData:
        return SiteData("hospital-0", data, _tiny_data(4), DatasetInfo("t", 2, 1, 2, 28, ("a", "b")))

    first, same, other = site(_tiny_data()), site(_tiny_data()), site(_tiny_data(17))

    assert dataset_fingerprint(first) == dataset_fingerprint(same) != dataset_fingerprint(other)
    key = id(first)
    assert key in privacy._FINGERPRINTS
    del first
    gc.collect()
    assert key not in privacy._FINGERPRINTS  # no site data kept alive by the cache


def test_ledger_persists_merges_by_id_and_refuses_when_unreadable(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path, "abc")
    first, second = _entry(1.0, 0.1, 10), _entry(1.0, 0.1, 10)

    ledger.record([first])
    after_restart = PrivacyLedger(tmp_path, "abc")
    entries = after_restart.record([first, second])  # first again (from context.state): kept once

    assert [e.id for e in entries] == [first.id, second.id]
    assert [e.id for e in PrivacyLedger(tmp_path, "abc").entries()] == [first.id, second.id]
    ledger.path.write_text("{half a json", encoding="utf-8")
    with pytest.raises(PrivacyBudgetExceeded, match="unreadable"):
        PrivacyLedger(tmp_path, "abc").entries()


# --- DP-SGD ----------------------------------------------------------------------------------------------------
def _tiny_data(n: int = 16) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(images=rng.normal(size=(n, 1, 28, 28)).astype(np.float32),
                        labels=rng.integers(0, 2, size=n).astype(np.int64))


def test_dp_sgd_without_noise_or_clipping_equals_plain_sgd() -> None:
    # Prepare: one full batch (Poisson rate 1 includes every sample), SGD, no momentum
    data = _tiny_data()
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.1, batch_size=len(data))
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="smallcnn", width=4), spatial_dims=2, in_channels=1, n_classes=2)
    private = copy.deepcopy(plain)

    # Execute
    train_epochs(plain, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=3)
    result = train_epochs(private, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=3,
                          privacy=DPTraining(noise_multiplier=0.0, max_grad_norm=1e9))

    # Assert
    assert result.steps == 1 and result.sample_rate == 1.0
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(private.state_dict()[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", available_models())
def test_a_clipped_dp_step_is_the_mean_of_per_image_autograd_gradients_clipped(name: str) -> None:
    # Prepare: a full batch (Poisson rate 1), SGD, no noise, a clipping norm every image's gradient exceeds. The
    # reference is independent of Opacus: one autograd pass per image, each gradient clipped, then averaged.
    data = _tiny_data(6)
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.5, batch_size=len(data))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=4), spatial_dims=2, in_channels=1, n_classes=2)
    start = copy.deepcopy(model)
    clip = 1e-3
    total = [torch.zeros_like(p) for p in start.parameters()]
    norms, losses = [], []
    for image, label in zip(torch.from_numpy(data.images), torch.from_numpy(data.labels), strict=True):
        start.zero_grad()
        loss = torch.nn.functional.cross_entropy(start(image[None]), label[None])
        losses.append(float(loss))
        loss.backward()
        grads = [p.grad.detach().clone() for p in start.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
    expected = [p.detach() - cfg.lr * t / len(data) for p, t in zip(start.parameters(), total, strict=True)]

    # Execute
    result = train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=0,
                          privacy=DPTraining(noise_multiplier=0.0, max_grad_norm=clip))

    # Assert: clipping was active for every image, the update is the clipped mean, the loss reported the mean
    assert result.steps == 1 and result.sample_rate == 1.0
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert min(norms) > 10 * clip
    for (key, got), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-7, msg=key)


def test_class_weights_are_refused_with_dp_sgd() -> None:
    with pytest.raises(ConfigError, match=r"train.class_weighting=balanced cannot run with privacy=dp.*"
                                          r"class_weighting=none"):
        compose_config(["privacy=dp", "train.class_weighting=balanced"])
    model = build_model(ModelConfig(name="smallcnn", width=4), spatial_dims=2, in_channels=1, n_classes=2)
    with pytest.raises(ValueError, match="class weights"):
        train_epochs(model, _tiny_data(), TrainConfig(class_weighting="balanced"), epochs=1, n_classes=2,
                     spatial_dims=2, seed=0, privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_counts_poisson_steps_and_leaves_the_model_unwrapped(mode: str) -> None:
    data = _tiny_data(40)
    cfg = TrainConfig(batch_size=16)
    model = build_model(ModelConfig(name="smallcnn", width=4), spatial_dims=2, in_channels=1, n_classes=2)

    result = train_epochs(model, data, cfg, epochs=2, n_classes=2, spatial_dims=2, seed=0,
                          privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=8,
                                             grad_sample_mode=mode))

    assert (result.sample_rate, result.steps) == sampling(40, 16, 2)
    assert all(not k.startswith("_module") for k in model.state_dict())
    assert math.isfinite(result.loss)


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("dims", [2, 3])
def test_every_registered_model_passes_opacus_validation(name: str, dims: int) -> None:
    from opacus.validators import ModuleValidator

    model = build_model(ModelConfig(name=name, width=4), spatial_dims=dims, in_channels=3, n_classes=3)

    assert ModuleValidator.validate(model, strict=False) == []
    require_dp_compatible(model, name)


@pytest.mark.skipif(HAS_CSPRNG, reason="torchcsprng is installed here")
def test_secure_mode_without_torchcsprng_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="secure_mode=true needs the torchcsprng package"):
        DPConfig(secure_mode=True).require_runtime()


def test_a_batchnorm_model_is_refused_at_start_up() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="cannot be trained with differential privacy.*BatchNorm"):
        require_dp_compatible(model, "custom")


# --- the ClientApp with DP -------------------------------------------------------------------------------------
def _context(tmp_path, node_config: dict | None = None, overrides: list[str] = DP) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={keys.NODE_PARTITION_ID: 1, "num-partitions": 3, **(node_config or {})},
        state=RecordDict(),
        run_config=run_config_from_overrides(overrides, **{keys.RUN_CACHE_DIR: str(tmp_path / "cache"),
                                                         keys.RUN_STATE_DIR: str(tmp_path / "state")}),
    )


def _train_message(server_round: int, run_id: int = 1):
    cfg = compose_config(DP)
    arrays = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return instruction(content, MessageType.TRAIN, run_id=run_id)


def test_epsilon_grows_every_round_and_survives_a_restart(tmp_path) -> None:
    context = _context(tmp_path)
    eps, sized = [], []
    for server_round in (1, 2):
        out = app(_train_message(server_round), context)
        assert not out.has_error(), out.error
        eps.append(out.content[keys.METRICS][keys.EPSILON])
        sized.append(keys.NOISED_TRAIN_COUNT in out.content[keys.METRICS])
    assert sized == [True, False]

    restarted = _context(tmp_path)  # a new daemon: empty context.state, the ledger on disk remains
    out = app(_train_message(3), restarted)
    eps.append(out.content[keys.METRICS][keys.EPSILON])

    assert 0 < eps[0] < eps[1] < eps[2] <= 4.0
    assert out.content[keys.METRICS][keys.DELTA] == 1e-5
    # what leaves the site: the model's own arrays, scalars, the site id; no pixel array rides along
    cfg = compose_config(DP)
    model_keys = set(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    assert set(out.content.keys()) == {keys.ARRAYS, keys.METRICS, keys.SITE}
    assert set(out.content[keys.ARRAYS].keys()) == model_keys
    assert all(isinstance(v, (int, float)) for v in out.content[keys.METRICS].values())
    # metered: no training loss, exact count or timing (finding 4 of issue 21); the training split's noised size
    # went once, with the run's first round (and the restart did not send it again)
    assert set(out.content[keys.METRICS]) == {keys.NUM_EXAMPLES, keys.EPSILON, keys.EPSILON_CHARGED, keys.DELTA,
                                              keys.NOISE_MULTIPLIER}
    assert out.content[keys.METRICS][keys.NUM_EXAMPLES] == 1
    assert out.content[keys.METRICS][keys.EPSILON_CHARGED] == pytest.approx(eps[2] - eps[1])
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    assert [e["kind"] for e in json.loads(ledger.read_text())["entries"]] == ["train", "count", "train", "train"]


def test_a_site_at_its_cap_refuses_to_train_and_says_why(tmp_path) -> None:
    # Prepare: the hospital allows epsilon 1 in all; the run asks for 4. Its noise is raised so the run fits 1.
    # (the run's 5 noised evaluations, reserved by the plan, are made cheap: at the default noise they alone
    # would not fit a cap of 1, test_a_cap_too_small_for_the_runs_evaluations_refuses_before_training)
    cap = {keys.NODE_MAX_EPSILON: 1.0}
    recipe = [*DP, "privacy.eval_share=0.01"]
    context = _context(tmp_path, cap, recipe)
    rounds = [app(_train_message(r), context) for r in (1, 2, 3)]

    # Execute: a second run on the same data finds the budget spent
    with pytest.raises(SiteFailure) as refused:  # what Flower forwards to the server as the error reason
        app(_train_message(1, run_id=2), _context(tmp_path, cap, recipe))

    # Assert
    assert not any(m.has_error() for m in rounds)
    assert [m.content[keys.METRICS][keys.EPSILON] for m in rounds][-1] <= 1.0
    reason = str(refused.value)
    assert reason.startswith("PrivacyBudgetExceeded: Privacy cap reached") and "does not train" in reason
    assert str(tmp_path) not in reason
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    entries = [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]
    assert [e.kind for e in entries] == ["train", "count", "train", "train"]  # the refused round spent nothing
    assert epsilon_spent(entries, 1e-5) <= 1.0


def test_the_site_reads_its_secure_rng_demand_and_refuses_a_bad_value() -> None:
    federation = FederationConfig()
    assert not site_cap(federation, {}, None).secure_rng  # simulation: the recipe's privacy.secure_mode decides
    for raw, expected in ((True, True), ("false", False), (1.0, True), ("yes", True)):
        assert site_cap(federation, {keys.NODE_SECURE_RNG: raw}, None).secure_rng is expected
    with pytest.raises(ConfigError, match="secure-rng='sometimes' is not true or false"):
        site_cap(federation, {keys.NODE_SECURE_RNG: "sometimes"}, None)


@pytest.mark.skipif(HAS_CSPRNG, reason="torchcsprng is installed here; the next test covers this machine")
def test_a_site_demanding_a_secure_rng_without_torchcsprng_refuses_dp_and_spends_nothing(tmp_path) -> None:
    with pytest.raises(SiteFailure) as refused:
        app(_train_message(1), _context(tmp_path, {keys.NODE_SECURE_RNG: True}))

    reason = str(refused.value)
    assert reason.startswith("ConfigError: this hospital's site config (secure_rng: true) asks for DP noise from a "
                             "cryptographically secure RNG, but torchcsprng is not installed")
    assert "does not train with privacy=dp" in reason and "secure_rng: false" in reason
    assert str(tmp_path) not in reason
    assert not list((tmp_path / "state").glob("privacy/*.json"))  # refused before the ledger: nothing spent
    # the same site without the demand trains (the recipe does not ask for secure_mode), and Opacus' warning that
    # its RNG is not secure is shown, not silenced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = app(_train_message(1), _context(tmp_path, {keys.NODE_SECURE_RNG: False}))
    assert not out.has_error()
    assert [w for w in caught if "Secure RNG turned off" in str(w.message)]


@pytest.mark.skipif(not HAS_CSPRNG, reason="torchcsprng is not installed (no wheel for this torch; CI lacks it)")
def test_a_site_demanding_a_secure_rng_trains_with_opacus_secure_mode(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = app(_train_message(1), _context(tmp_path, {keys.NODE_SECURE_RNG: True}))

    assert not out.has_error(), out.error
    assert 0 < out.content[keys.METRICS][keys.EPSILON] <= 4.0
    assert not [w for w in caught if "Secure RNG turned off" in str(w.message)]
    assert secure_rng_problem(torch.device("cpu")) is None


# --- client-level DP (privacy=central_dp) ----------------------------------------------------------------------
def test_central_dp_runs_clip_each_hospital_update_and_other_runs_are_untouched(tmp_path) -> None:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    overrides = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3", "train.lr=0.05"]
    cfg = compose_config(overrides)
    sent = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    before = np.concatenate([a.ravel() for a in sent.to_numpy_ndarrays()])

    def update_norm(config: dict) -> float:
        content = RecordDict({keys.ARRAYS: sent, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1, **config})})
        out = app(instruction(content, MessageType.TRAIN), _context(tmp_path, overrides=overrides))
        after = np.concatenate([a.ravel() for a in out.content[keys.ARRAYS].to_numpy_ndarrays()])
        return float(np.linalg.norm(after - before))

    assert update_norm({KEY_CLIPPING_NORM: 0.01}) == pytest.approx(0.01, rel=1e-3)
    assert update_norm({}) > 0.05  # without the server's clipping norm nothing is clipped



def test_steps_beyond_the_plan_are_recorded_too(tmp_path, monkeypatch) -> None:
    import medfed.client.local_round as local_round
    from medfed.client.training import LocalTrainResult

    real = local_round.train_epochs

    def one_step_too_many(*args, **kwargs):
        result = real(*args, **kwargs)
        return LocalTrainResult(result.loss, result.num_examples, result.steps + 1, result.seconds, result.sample_rate)

    monkeypatch.setattr(local_round, "train_epochs", one_step_too_many)

    out = app(_train_message(1), _context(tmp_path))

    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    entries = [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]
    assert [e.steps for e in entries][-1] == 1  # the excess, after the planned entry
    assert out.content[keys.METRICS][keys.EPSILON] == pytest.approx(epsilon_spent(entries, 1e-5))


def test_a_round_that_crashes_while_training_has_already_spent_its_privacy(tmp_path, monkeypatch) -> None:
    # Prepare: training dies half-way (issue 28: recording the ledger entry after training went unnoticed)
    import medfed.client.local_round as local_round

    def crash(*args, **kwargs):
        raise RuntimeError("the machine lost power mid-round")

    monkeypatch.setattr(local_round, "train_epochs", crash)

    # Execute
    with pytest.raises(SiteFailure, match="RuntimeError while handling train"):
        app(_train_message(1), _context(tmp_path))

    # Assert: the round is in the ledger on disk, with its planned steps
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    entries = [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]
    trained = [e for e in entries if e.kind == "train"]
    assert len(trained) == 1 and trained[0].server_round == 1 and trained[0].steps > 0
    assert epsilon_spent(entries, 1e-5) > 0


def test_a_cap_below_the_runs_target_gives_its_evaluations_the_same_share_of_the_cap_and_trains(tmp_path) -> None:
    # Prepare: cap 1 against the run's target 4; at the run's evaluation noise (a quarter of 4) the 4 evaluations
    # and 2 calibration stages alone would spend about 1, so the site noises them for a quarter of its own cap
    context = _context(tmp_path, {keys.NODE_MAX_EPSILON: 1.0})

    # Execute
    out = app(_train_message(1), context)

    # Assert: it trained, and the round with every release still to come fits its cap
    assert not out.has_error(), out.error
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    entries = [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]
    assert [e.kind for e in entries] == ["train", "count"]
    assert epsilon_spent(entries, 1e-5) <= 1.0


def test_a_cap_too_small_for_even_one_step_refuses_before_training(tmp_path) -> None:
    with pytest.raises(SiteFailure, match="PrivacyBudgetExceeded: Privacy cap reached") as refused:
        app(_train_message(1), _context(tmp_path, {keys.NODE_MAX_EPSILON: 0.001}))

    assert "noise multiplier above" in str(refused.value)
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    assert json.loads(ledger.read_text())["entries"] == []  # nothing spent


@pytest.mark.parametrize("task", ["classify", "ssl"])
def test_a_metered_evaluation_sends_only_noised_sums_and_is_charged(tmp_path, task) -> None:
    from medfed.common.models.ssl import build_task_model

    overrides = [*DP, "task=ssl", "ssl.method=mim", "model.width=8"] if task == "ssl" else DP
    cfg = compose_config(overrides)
    arrays = ArrayRecord(build_task_model(cfg, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    message = instruction(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}),
                          MessageType.EVALUATE)

    out = app(message, _context(tmp_path, overrides=overrides))

    assert not out.has_error(), out.error
    metrics = dict(out.content[keys.METRICS])
    assert metrics[keys.NUM_EXAMPLES] == 1
    assert not {keys.N_VAL, keys.N_TRAIN, keys.EVAL_TIME_S} & set(metrics)
    assert not any(k.startswith(keys.EVAL_PREFIX) for k in metrics)  # no metric computed on exact data
    noised = {keys.NOISED_COUNT, keys.NOISED_SSL_LOSS} if task == "ssl" else {keys.DP_CLASSES}
    assert noised <= set(metrics)
    (ledger,) = (tmp_path / "state" / "privacy").glob("*.json")
    (entry,) = [LedgerEntry(**e) for e in json.loads(ledger.read_text())["entries"]]
    assert entry.kind == "evaluate" and entry.sample_rate == 1.0 and entry.steps == 1
    assert metrics[keys.EPSILON] == pytest.approx(epsilon_spent([entry], 1e-5))
    assert metrics[keys.EPSILON_CHARGED] == pytest.approx(metrics[keys.EPSILON])  # the ledger's first entry


def test_a_metered_round_in_secaggs_legacy_layout_sends_only_the_accounting_in_clear(tmp_path) -> None:
    # Flower's secaggplus_mod masks the arrays only; the FitRes metrics travel in clear, so they must hold nothing
    # computed on the data (finding 4 of issue 21)
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    cfg = compose_config(DP)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    fitins = FitIns(ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
                    {keys.SERVER_ROUND: 1})
    message = instruction(compat.fitins_to_recorddict(fitins, keep_input=True), MessageType.TRAIN)

    out = app(message, _context(tmp_path))

    assert not out.has_error(), out.error
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    assert fitres.num_examples == 1
    assert set(fitres.metrics) == {keys.NUM_EXAMPLES, keys.EPSILON, keys.EPSILON_CHARGED, keys.DELTA,
                                   keys.NOISE_MULTIPLIER, keys.SITE_ID, keys.NOISED_TRAIN_COUNT}  # (the run's first round: its noised size, once)
    assert fitres.metrics[keys.NOISED_TRAIN_COUNT] != round(fitres.metrics[keys.NOISED_TRAIN_COUNT])


def test_a_round_whose_noised_size_no_longer_fits_still_sends_its_update(tmp_path, monkeypatch) -> None:
    # the plan reserves the size release; should another run take that room meanwhile, the trained (and charged)
    # update still goes, without the size
    import medfed.client.local_round as local_round

    def no_room(*args, **kwargs):
        raise PrivacyBudgetExceeded("Privacy cap reached: no room")

    monkeypatch.setattr(local_round, "release_train_count", no_room)

    out = app(_train_message(1), _context(tmp_path))

    assert not out.has_error(), out.error
    assert keys.ARRAYS in out.content and keys.NOISED_TRAIN_COUNT not in out.content[keys.METRICS]
