"""A hospital's distributed-DP round (issue 20): the run's plan, the checks before anything is spent, the ledger
entry, what the reply carries; the ledger's composition of Skellam rounds with Gaussian releases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from medfed.client.distributed_round import OVERFLOW, SecAggSettings, _entry, distributed_round, trainable_dim
from medfed.client.ledger import SKELLAM, LedgerEntry, PrivacyLedger, ledger_key
from medfed.client.node import NodeEnv
from medfed.client.privacy import epsilon_spent
from medfed.common.skellam import SkellamStep, plan_scale, skellam_epsilon
from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.data import ArrayDataset, DatasetInfo, SiteData
from medfed.common.distributed_plan import plan_distributed, run_releases
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded
from torch import nn

from tests.unit.client.test_ledger import _State

DDP = ["privacy=distributed_dp", "federation.hospitals=3", "train.rounds=4", "privacy.target_epsilon=4"]


def _site(n: int = 40) -> SiteData:
    rng = np.random.default_rng(0)
    images, labels = rng.random((n, 1, 8, 8)).astype(np.float32), np.arange(n) % 2
    data = ArrayDataset(images, labels)
    return SiteData("st-marys", train=data, val=data, info=DatasetInfo("site:st-marys", 2, 1, 2, 8, ("0", "1")))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def _secagg(cfg, dim: int, **changes) -> SecAggSettings:
    transport = plan_distributed(cfg, dim).transport
    values = {"sample_num": 3, "peers": 3, "clipping_range": transport.clipping_range,
              "target_range": transport.quantization_range, "mod_range": transport.modulus_range, "max_weight": 1.0}
    return SecAggSettings(**{**values, **changes})


def _env(tmp_path: Path) -> NodeEnv:
    return NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {keys.RUN_STATE_DIR: str(tmp_path)})


def _ledger(tmp_path: Path, site: SiteData) -> list[LedgerEntry]:
    return PrivacyLedger(tmp_path, ledger_key(site)).entries()


def test_the_plan_spends_the_target_with_the_runs_evaluations_and_is_the_same_everywhere():
    cfg = compose_config(DDP)
    plan = plan_distributed(cfg, 130)

    [((noise, _), count)] = run_releases(cfg, cfg.privacy).items()
    releases = [LedgerEntry("e", 1, 1, noise, 1.0, count, 0.0, "evaluate")]
    rounds = _entry(plan, 1, 1, noise=plan.noise_multiplier, steps=cfg.train.rounds)
    spent = epsilon_spent([*releases, rounds], 1e-5)
    assert 0.99 * 4 <= spent <= 4  # the least noise that fits (0.1 % search)
    assert plan == plan_distributed(compose_config(DDP), 130)  # a function of the config and the model size only
    assert plan.scale == 2 ** round(math.log2(plan.scale))
    assert plan_scale(clip=1.0, dim=130, noise=plan.noise_multiplier, honest=3, max_batch=10000,
                      transport=plan.transport) >= plan.scale  # the noised sums fit the range at this scale
    l2, _ = plan.sensitivity
    assert plan.variance == pytest.approx((plan.noise_multiplier * l2) ** 2)
    assert plan.share_variance == pytest.approx(plan.variance / 3)
    # a smaller target needs more noise; metering off leaves all of the target to the rounds
    assert plan_distributed(compose_config([*DDP, "privacy.target_epsilon=1"]), 130).noise_multiplier > \
        plan.noise_multiplier
    assert plan_distributed(compose_config([*DDP, "privacy.exact_metrics=true"]), 130).noise_multiplier < \
        plan.noise_multiplier


def test_shares_are_sized_for_the_dropouts_and_colluders_the_run_allows():
    plan = plan_distributed(compose_config([*DDP, "privacy.max_dropouts=1", "privacy.max_colluding=1"]), 130)

    assert plan.honest == 1
    assert plan.share_variance == pytest.approx(plan.variance)  # the one honest hospital adds all of it
    with pytest.raises(ConfigError, match="no hospital certain to add honest noise"):
        plan_distributed(compose_config([*DDP, "privacy.max_dropouts=2", "privacy.max_colluding=1"]), 130)


def test_a_target_out_of_reach_is_refused_with_the_ceiling():
    cfg = compose_config([*DDP, "privacy.target_epsilon=0.01", "privacy.max_noise_multiplier=2"])

    with pytest.raises(PrivacyBudgetExceeded, match="max_noise_multiplier=2"):
        plan_distributed(cfg, 130)


def test_a_round_records_its_skellam_entry_and_sends_integers_in_range_with_scalars_only(tmp_path):
    cfg = compose_config([*DDP, "privacy.exact_metrics=true"])
    site, model, env, state = _site(), _model(), _env(tmp_path), _State()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    out = distributed_round(cfg, site, model, env, state, run_id=7, server_round=1,
                            secagg=_secagg(cfg, trainable_dim(model)))

    plan = plan_distributed(cfg, trainable_dim(model))
    [entry] = _ledger(tmp_path, site)
    assert (entry.mechanism, entry.run_id, entry.server_round, entry.steps) == (SKELLAM, 7, 1, 1)
    assert (entry.noise_multiplier, entry.sample_rate, (entry.l2, entry.l1)) == \
        (plan.noise_multiplier, 1.0, plan.sensitivity)
    assert out.values.shape == (trainable_dim(model),)
    assert np.array_equal(out.values, np.rint(out.values)) and np.abs(out.values).max() <= plan.transport.bound
    assert set(out.metrics) == {keys.NUM_EXAMPLES, keys.EPSILON, keys.EPSILON_CHARGED, keys.DELTA,
                                keys.NOISE_MULTIPLIER, OVERFLOW, keys.N_TRAIN}
    assert out.metrics[keys.NUM_EXAMPLES] == 1 and out.metrics[OVERFLOW] == 0
    assert out.metrics[keys.EPSILON] == pytest.approx(epsilon_spent([entry], 1e-5))
    assert out.metrics[keys.EPSILON_CHARGED] == pytest.approx(out.metrics[keys.EPSILON])
    assert json.loads(state.raw)[0]["mechanism"] == SKELLAM  # mirrored in the node's state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed
    # the noise in the reply is about the share's size: far above the clipped sum of 40 images
    assert np.std(out.values) == pytest.approx(math.sqrt(plan.share_variance), rel=0.3)


def test_a_metered_round_sends_the_training_splits_noised_size_once_per_run(tmp_path):
    cfg = compose_config(DDP)
    site, model, env, state = _site(), _model(), _env(tmp_path), _State()
    secagg = _secagg(cfg, trainable_dim(model))

    first = distributed_round(cfg, site, model, env, state, run_id=7, server_round=1, secagg=secagg)
    second = distributed_round(cfg, site, model, env, state, run_id=7, server_round=2, secagg=secagg)

    assert keys.N_TRAIN not in first.metrics and keys.NOISED_TRAIN_COUNT in first.metrics
    assert keys.NOISED_TRAIN_COUNT not in second.metrics
    kinds = sorted(e.kind for e in _ledger(tmp_path, site))
    assert kinds == ["count", "train", "train"]
    assert second.metrics[keys.EPSILON] == pytest.approx(epsilon_spent(_ledger(tmp_path, site), 1e-5))


@pytest.mark.parametrize(("changes", "why"), [
    (None, "did not come through SecAgg\\+"),
    ({"sample_num": 1}, "sum 1 hospitals"),
    ({"sample_num": 4, "peers": 4}, "more than the 3 this run's integer range is planned for"),
    ({"peers": 2}, "2 keys received"),
    ({"target_range": 2**22}, "travel exactly"),
    ({"max_weight": 100.0}, "travel exactly"),
])
def test_a_share_secagg_would_not_hide_or_carry_exactly_is_never_computed_or_charged(tmp_path, changes, why):
    cfg = compose_config(DDP)
    site, model = _site(), _model()
    secagg = None if changes is None else _secagg(cfg, trainable_dim(model), **changes)

    with pytest.raises(ConfigError, match=why):
        distributed_round(cfg, site, model, _env(tmp_path), _State(), run_id=7, server_round=1, secagg=secagg)

    assert _ledger(tmp_path, site) == []


def test_a_max_dropouts_run_accepts_a_sum_over_the_hospitals_it_allows_to_be_missing(tmp_path):
    cfg = compose_config([*DDP, "privacy.max_dropouts=1", "privacy.exact_metrics=true"])
    site, model = _site(), _model()

    distributed_round(cfg, site, model, _env(tmp_path), _State(), run_id=7, server_round=1,
                      secagg=_secagg(cfg, trainable_dim(model), sample_num=2, peers=2))

    assert len(_ledger(tmp_path, site)) == 1


def test_a_site_whose_cap_cannot_afford_the_run_refuses_and_spends_nothing(tmp_path):
    cfg = compose_config([*DDP, "federation.site_max_epsilon=2"])
    site, model = _site(), _model()

    with pytest.raises(PrivacyBudgetExceeded, match=r"remaining distributed-DP rounds .* above its cap 2"):
        distributed_round(cfg, site, model, _env(tmp_path), _State(), run_id=7, server_round=1,
                          secagg=_secagg(cfg, trainable_dim(model)))

    assert _ledger(tmp_path, site) == []


def test_a_site_wanting_more_noise_than_the_plan_adds_all_of_it_itself(tmp_path):
    cfg = compose_config([*DDP, "federation.site_min_noise=50", "privacy.exact_metrics=true",
                          "privacy.target_epsilon=8"])
    site, model = _site(), _model()
    plan = plan_distributed(cfg, trainable_dim(model))
    assert plan.noise_multiplier < 50

    out = distributed_round(cfg, site, model, _env(tmp_path), _State(), run_id=7, server_round=1,
                            secagg=_secagg(cfg, trainable_dim(model)))

    [entry] = _ledger(tmp_path, site)
    assert entry.noise_multiplier == out.metrics[keys.NOISE_MULTIPLIER] == 50
    assert np.std(out.values) == pytest.approx(50 * plan.sensitivity[0], rel=0.3)  # the whole noise, not a share


def test_a_skellam_entry_at_a_fine_scale_costs_what_the_gaussian_does_and_entries_compose():
    gaussian = LedgerEntry("g", 1, 1, 6.0, 1.0, 30, 0.0)
    skellam = LedgerEntry("s", 1, 1, 6.0, 1.0, 30, 0.0, mechanism=SKELLAM, l2=2.0**20, l1=2.0**20 * 10)
    release = LedgerEntry("e", 1, 1, 20.0, 1.0, 5, 0.0, "evaluate")

    alone = epsilon_spent([skellam], 1e-5)
    assert alone == pytest.approx(epsilon_spent([gaussian], 1e-5), rel=0.01)  # integer orders only, no rounding cost
    assert alone == pytest.approx(skellam_epsilon([SkellamStep((6.0 * 2**20) ** 2, 2.0**20, 2.0**20 * 10, 1.0,
                                                               30)], 1e-5))
    # subsampled, the general bound (Zhu and Wang) is never below the exact subsampled Gaussian's
    assert epsilon_spent([LedgerEntry("s", 1, 1, 1.5, 0.2, 30, 0.0, mechanism=SKELLAM, l2=2.0**20, l1=2.0**20)],
                         1e-5) >= epsilon_spent([LedgerEntry("g", 1, 1, 1.5, 0.2, 30, 0.0)], 1e-5)
    both = epsilon_spent([skellam, release], 1e-5)
    assert alone < both < alone + epsilon_spent([release], 1e-5)  # RDP composition: less than the sum of epsilons
    # steps of the same Skellam round compose as one entry with their steps added
    halves = [LedgerEntry(str(i), 1, 1, 6.0, 1.0, 15, 0.0, mechanism=SKELLAM, l2=2.0**20, l1=2.0**20 * 10)
              for i in range(2)]
    assert epsilon_spent(halves, 1e-5) == pytest.approx(alone)
    # coarse rounding costs more than the Gaussian at the same multiplier
    coarse = LedgerEntry("c", 1, 1, 6.0, 1.0, 30, 0.0, mechanism=SKELLAM, l2=4.0, l1=40.0)
    assert epsilon_spent([coarse], 1e-5) > alone


def test_an_older_ledger_entry_without_a_mechanism_reads_as_gaussian(tmp_path):
    site = _site()
    ledger = PrivacyLedger(tmp_path, ledger_key(site))
    ledger.path.parent.mkdir(parents=True)
    old = {"id": "x", "run_id": 1, "server_round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10,
           "recorded_at": 0.0, "kind": "train"}
    ledger.path.write_text(json.dumps({"version": 1, "dataset": ledger.fingerprint, "entries": [old]}))

    [entry] = ledger.entries()

    assert (entry.mechanism, entry.l2, entry.l1) == ("gaussian", 0.0, 0.0)


def test_the_composition_adds_every_entrys_rdp_order_by_order_and_converts_once():
    from opacus.accountants.analysis import rdp

    from medfed.common.skellam import ORDERS, skellam_rdp

    entries = [LedgerEntry("a", 1, 1, 2.0, 0.5, 7, 0.0), LedgerEntry("b", 1, 1, 5.0, 1.0, 3, 0.0, "evaluate"),
               LedgerEntry("c", 1, 1, 6.0, 1.0, 4, 0.0, mechanism=SKELLAM, l2=300.0, l1=3000.0)]

    curve = (rdp.compute_rdp(q=0.5, noise_multiplier=2.0, steps=7, orders=list(ORDERS))
             + rdp.compute_rdp(q=1.0, noise_multiplier=5.0, steps=3, orders=list(ORDERS))
             + 4 * np.asarray([skellam_rdp(a, variance=(6.0 * 300.0) ** 2, l2=300.0, l1=3000.0) for a in ORDERS]))
    expected, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=1e-5)
    assert epsilon_spent(entries, 1e-5) == pytest.approx(expected, rel=1e-9)
    assert epsilon_spent(entries[:2], 1e-5) < epsilon_spent(entries, 1e-5)  # (Gaussian alone: Opacus' own orders)


def test_a_frozen_encoder_sends_the_sum_of_its_heads_gradients_only(tmp_path):
    from medfed.common.models.ssl import build_task_model

    cfg = compose_config([*DDP, "model.finetune=linear_probe", "privacy.exact_metrics=true"])
    torch.manual_seed(0)
    model = build_task_model(cfg, spatial_dims=2, in_channels=1, n_classes=2)
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable_dim(model) == head < sum(p.numel() for p in model.parameters())
    site = _site()

    out = distributed_round(cfg, site, model, _env(tmp_path), _State(), run_id=7, server_round=1,
                            secagg=_secagg(cfg, trainable_dim(model)))

    assert out.values.shape == (head,)
    [entry] = _ledger(tmp_path, site)
    assert (entry.l2, entry.l1) == plan_distributed(cfg, head).sensitivity


@pytest.mark.parametrize("overrides", [[], ["evaluate.calibrate=false", "evaluate.gradcam_samples=0"]])
def test_the_plan_reserves_exactly_the_releases_a_hospital_will_make(tmp_path, overrides):
    from medfed.client.dp_round import planned_evaluations, release_noise

    cfg = compose_config([*DDP, *overrides])
    env = _env(tmp_path)

    [((noise, rate), count)] = run_releases(cfg, cfg.privacy).items()

    planned = planned_evaluations(cfg, cfg.privacy, env, run_id=1, server_round=1, entries=[])
    assert (noise, rate) == (release_noise(cfg.privacy, env, cfg), 1.0)
    assert count == len(planned) and {(e.noise_multiplier, e.sample_rate, e.steps) for e in planned} == {(noise, 1.0, 1)}
