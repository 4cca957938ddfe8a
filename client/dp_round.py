"""Privacy planning at a hospital: one training round (check the site's RNG and cap, plan, record, then train),
and one noised release of evaluation statistics (check the cap, record, then release).

A round or a release is recorded in the site's ledger *before* it happens (a crash midway has still spent its
privacy), and one the site refuses (no secure RNG where one is asked for, a cap it would pass) spends nothing.
Training planned under ``privacy=dp`` reserves room for the run's evaluations still to come
(:func:`planned_evaluations`), so the run's target epsilon and the site's cap cover everything the run releases.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from medfed.client.node import NodeEnv, NodeState
from medfed.client.ledger import (
    LedgerEntry,
    PrivacyLedger,
    absorb_older,
    dataset_fingerprint,
    entries_from_state,
    entries_to_state,
    ledger_key,
)
from medfed.client.privacy import (
    RoundPlan,
    costed,
    epsilon_spent,
    plan_release,
    plan_round,
    release_noise_for,
    secure_rng_problem,
)
from medfed.client.training import DPTraining, select_device
from medfed.common.config import Config, DPConfig, TrainConfig
from medfed.common.data import SiteData
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded
from medfed.common.noised_stats import gaussian_release, noise_rng

__all__ = [
    "COUNT",
    "PrivateRound",
    "Release",
    "RunPreview",
    "charge_release",
    "metered",
    "plan_recipe",
    "plan_training",
    "planned_evaluations",
    "preview_run",
    "release_train_count",
    "start_private_round",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateRound:
    """A DP round planned and recorded at a site: its plan, the ledger it is recorded in, and how to train it."""

    plan: RoundPlan
    ledger: PrivacyLedger
    state: NodeState
    dp: DPConfig
    secure_rng: bool
    run_id: int
    server_round: int

    def training(self) -> DPTraining:
        """The DP-SGD settings of this round's local training."""
        return plan_training(self.plan, self.dp, secure_mode=self.secure_rng)

    def recipe(self, train: TrainConfig) -> TrainConfig:
        """The recipe this round trains with (:func:`plan_recipe`)."""
        return plan_recipe(self.plan, train)

    def epsilon_after(self, steps_taken: int) -> float:
        """The site's cumulative epsilon once the round has trained ``steps_taken`` steps; steps beyond the plan
        (never expected: the ledger holds the plan) are recorded too before the figure is computed."""
        if steps_taken <= self.plan.steps:
            return self.plan.epsilon_after
        logger.error("DP training took %d steps, %d planned; recording the excess", steps_taken, self.plan.steps)
        excess = LedgerEntry.new(self.run_id, self.server_round, self.plan.noise_multiplier, self.plan.sample_rate,
                                 steps_taken - self.plan.steps)
        return epsilon_spent(_record(self.ledger, self.state, [excess]), self.plan.delta)


def plan_training(plan: RoundPlan, dp: DPConfig, *, secure_mode: bool) -> DPTraining:
    """The DP-SGD settings of training under ``plan`` (its noise; the run's clip, memory and per-sample mode)."""
    return DPTraining(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        max_physical_batch_size=dp.max_physical_batch_size,
        grad_sample_mode=dp.grad_sample_mode,
        secure_mode=secure_mode,
    )


def plan_recipe(plan: RoundPlan, train: TrainConfig) -> TrainConfig:
    """The recipe ``plan`` trains with: the run's, with the plan's batch size and local epochs (full-batch, fewer
    steps for a site whose cap does not fit the run's own)."""
    return dataclasses.replace(train, batch_size=plan.batch_size or train.batch_size, local_epochs=plan.local_epochs)


def _record(ledger: PrivacyLedger, state: NodeState, entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """Add entries to the on-disk ledger and mirror the whole ledger in the node's state; returns every entry."""
    recorded = ledger.record(entries)
    state.set_ledger_entries(entries_to_state(recorded))
    return recorded


def start_private_round(
    cfg: Config, dp: DPConfig, site: SiteData, env: NodeEnv, state: NodeState, *, run_id: int, server_round: int
) -> PrivateRound:
    """Plan this round under the site's cap and record it in the ledger before training (crash-safe).

    DP-SGD draws from a cryptographically secure RNG when the recipe's ``privacy.secure_mode`` or the site's
    ``secure-rng`` asks (either may), and then the site trains only if it has one.
    """
    cap = env.cap(cfg.federation)
    secure = dp.secure_mode or cap.secure_rng
    problem = secure_rng_problem(select_device(cfg.train.device)) if secure else None
    if problem:  # before the ledger: a refused round spends nothing
        asked = "this hospital's site config (secure_rng: true)" if cap.secure_rng else "privacy.secure_mode=true"
        fix = ("install torchcsprng, or set secure_rng: false in site.yaml for experiments" if cap.secure_rng
               else "install torchcsprng at every hospital, or run with privacy.secure_mode=false for experiments")
        raise ConfigError(f"{asked} asks for DP noise from a cryptographically secure RNG, but {problem}; so this "
                          f"hospital does not train with privacy=dp. To train: {fix}.")
    ledger = _site_ledger(env, site)
    with ledger.locked():  # what was spent, the plan and its record: one step for every process on this ledger
        entries = _spent(ledger, env, site, state)
        plan = plan_round(
            dp,
            cap,
            n_train=len(site.train),
            batch_size=cfg.train.batch_size,
            local_epochs=cfg.train.dp_epochs,
            rounds_left=cfg.train.rounds - server_round + 1,
            entries=entries,
            run_id=run_id,
            reserved=planned_evaluations(cfg, dp, env, run_id=run_id, server_round=server_round, entries=entries),
            server_round=server_round,
        )
        entry = LedgerEntry.new(run_id, server_round, plan.noise_multiplier, plan.sample_rate, plan.steps,
                                period=plan.period, batch_size=plan.batch_size, local_epochs=plan.local_epochs)
        _record(ledger, state, [entry])
    return PrivateRound(plan, ledger, state, dp, secure, run_id, server_round)


def _site_ledger(env: NodeEnv, site: SiteData) -> PrivacyLedger:
    return PrivacyLedger(env.state_dir, ledger_key(site))


def _spent(ledger: PrivacyLedger, env: NodeEnv, site: SiteData, state: NodeState) -> list[LedgerEntry]:
    """Every entry of the site's ledger (with an older byte-keyed ledger absorbed and the node's mirror merged);
    call under the ledger's lock."""
    absorb_older(ledger, PrivacyLedger(env.state_dir, dataset_fingerprint(site)))  # keyed by the data's bytes
    return ledger.record(entries_from_state(state.ledger_entries()))


def metered(cfg: Config, env: NodeEnv) -> DPConfig | None:
    """The DP settings under which this hospital releases evaluation statistics, or None when it releases exact
    ones. A site whose policy requires DP always meters (with the run's DP settings, or the defaults when the run
    asks for none); under ``privacy=dp`` every site meters unless the run asks for ``privacy.exact_metrics``
    (research only: a site with ``require_dp`` ignores it)."""
    dp = cfg.privacy if isinstance(cfg.privacy, DPConfig) else None
    if env.policy.require_dp:
        if dp is not None and dp.exact_metrics:
            logger.warning("the run asks for exact metrics; this hospital's policy (require_dp) releases noised ones")
        return dp or DPConfig()
    if dp is None or dp.exact_metrics:
        return None
    return dp


def planned_evaluations(
    cfg: Config, dp: DPConfig, env: NodeEnv, *, run_id: int, server_round: int, entries: list[LedgerEntry]
) -> list[LedgerEntry]:
    """The noised releases the run will still ask after training round ``server_round`` began: one evaluation per
    round from this one to the last, the two final calibration stages when the run has them, and the training
    split's noised size once per run (none without metering)."""
    if metered(cfg, env) is None:
        return []
    sized = any(e.kind == COUNT and e.run_id == run_id for e in entries)
    count = max(0, cfg.train.rounds - server_round + 1) + _final_stages(cfg) + (0 if sized else 1)
    noise = release_noise(dp, env, cfg)
    return [LedgerEntry("reserved", run_id, server_round, noise, 1.0, 1, 0.0, "evaluate") for _ in range(count)]


def _final_stages(cfg: Config) -> int:
    return 2 if cfg.evaluate.final_stages else 0


def release_noise(dp: DPConfig, env: NodeEnv, cfg: Config) -> float:
    """The noise multiplier of every noised release of a run: the least with which the run's releases (one
    evaluation per round 0..``train.rounds``, the final stages, the training split's size), composed on their
    own, spend ``privacy.eval_share`` of ``privacy.target_epsilon``, or of the site's cap when that is smaller (so
    that a small cap leaves room to train); never below the site's ``min_noise``. It depends on the run config and
    the site's cap only."""
    cap = env.cap(cfg.federation)
    releases = cfg.train.rounds + 1 + _final_stages(cfg) + 1  # evaluations, final stages, the training split's size
    delta = min(dp.delta, cap.max_delta)
    noise = release_noise_for(dp.target_epsilon * dp.eval_share, delta, releases)
    if cap.max_epsilon < dp.target_epsilon:  # a site whose own cap is smaller: the same share of its cap
        noise = max(noise, release_noise_for(cap.max_epsilon * dp.eval_share, delta, releases))
    return max(noise, cap.min_noise)


@dataclass(frozen=True)
class Release:
    """A noised release the site has admitted and recorded: its noise multiplier and the site's epsilon after."""

    noise_multiplier: float
    epsilon_after: float
    delta: float
    epsilon_before: float = 0.0

    @property
    def charged(self) -> float:
        """What this release adds to the site's epsilon."""
        return self.epsilon_after - self.epsilon_before


COUNT = "count"  # the ledger kind of the once-per-run release of the training split's noised size


def charge_release(
    cfg: Config, dp: DPConfig, site: SiteData, env: NodeEnv, state: NodeState, *, run_id: int, server_round: int,
    kind: str,
) -> Release:
    """Admit one noised release of ``kind`` (evaluate, calibrate, reliability, count) under the site's cap and
    record it in the ledger before anything is computed; raises
    :class:`~medfed.common.errors.PrivacyBudgetExceeded` (and records nothing) when it would pass the cap."""
    release = _charge(cfg, dp, site, env, state, run_id=run_id, server_round=server_round, kind=kind, once=False)
    assert release is not None
    return release


def _charge(
    cfg: Config, dp: DPConfig, site: SiteData, env: NodeEnv, state: NodeState, *, run_id: int, server_round: int,
    kind: str, once: bool,
) -> Release | None:
    cap = env.cap(cfg.federation)
    delta = min(dp.delta, cap.max_delta)
    noise = release_noise(dp, env, cfg)
    ledger = _site_ledger(env, site)
    with ledger.locked():
        entries = _spent(ledger, env, site, state)
        if once and any(e.kind == kind and e.run_id == run_id for e in entries):
            return None
        before, after = plan_release(entries, noise_multiplier=noise, delta=delta, cap=cap, what=f"{kind} request")
        _record(ledger, state, [LedgerEntry.new(run_id, server_round, noise, 1.0, 1, kind)])
    return Release(noise, after, delta, before)


def release_train_count(
    cfg: Config, dp: DPConfig, site: SiteData, env: NodeEnv, state: NodeState, *, run_id: int, server_round: int
) -> tuple[float, Release] | None:
    """Once per run, the training split's size plus Gaussian noise (sensitivity 1), charged first: the
    coordinator's FedAvg weight for this site in place of the exact count. None when this run already has it."""
    release = _charge(cfg, dp, site, env, state, run_id=run_id, server_round=server_round, kind=COUNT, once=True)
    if release is None:
        return None
    noised = gaussian_release(np.array([float(len(site.train))]), 1.0, release.noise_multiplier, noise_rng())
    return float(noised[0]), release


@dataclass(frozen=True)
class RunPreview:
    """What a site would do over a whole run, planned before its first round (nothing recorded): the noise and
    steps of its DP-SGD rounds, the noise of its metered releases, and its epsilon once the run is done; or why
    it would refuse."""

    site_id: str
    n_train: int
    cap: float
    spent: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps_per_round: int | None = None
    batch_size: int | None = None
    period: int = 1  # trains every period-th round (a site whose cap fits fewer steps)
    release_noise: float | None = None
    releases: int = 0
    epsilon_after_run: float | None = None
    refusal: str | None = None


def preview_run(cfg: Config, dp: DPConfig, site: SiteData, env: NodeEnv) -> RunPreview:
    """The site's plan for a whole run from its first round, as :func:`start_private_round` would make it, with
    what its ledger already holds (read only: nothing is absorbed, planned into the ledger or recorded)."""
    cap = env.cap(cfg.federation)
    delta = min(dp.delta, cap.max_delta)
    ledger = _site_ledger(env, site)
    entries = ledger.entries()
    base = RunPreview(site.site_id, len(site.train), cap.max_epsilon, epsilon_spent(entries, delta))
    reserved = planned_evaluations(cfg, dp, env, run_id=-1, server_round=1, entries=[])
    try:
        plan = plan_round(dp, cap, n_train=len(site.train), batch_size=cfg.train.batch_size,
                          local_epochs=cfg.train.dp_epochs, rounds_left=cfg.train.rounds, entries=entries,
                          run_id=-1, reserved=reserved, server_round=1)
    except PrivacyBudgetExceeded as exc:
        return dataclasses.replace(base, refusal=str(exc))
    trained_rounds = -(-cfg.train.rounds // plan.period)
    rounds = costed(plan.noise_multiplier, plan.sample_rate, plan.steps * trained_rounds)
    return dataclasses.replace(
        base, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps_per_round=plan.steps,
        batch_size=plan.batch_size, period=plan.period,
        release_noise=reserved[0].noise_multiplier if reserved else None, releases=len(reserved),
        epsilon_after_run=epsilon_spent([*entries, rounds, *reserved], delta),
    )
