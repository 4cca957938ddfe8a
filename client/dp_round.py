"""Privacy planning of one training round at a hospital: check the site's RNG and cap, plan, record, then train.

The round is recorded in the site's ledger *before* it trains (a crash mid-round has still spent its privacy), and
a round the site refuses (no secure RNG where one is asked for, a cap it would pass) spends nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
from medfed.client.privacy import RoundPlan, epsilon_spent, plan_round, secure_rng_problem
from medfed.client.training import DPTraining, select_device
from medfed.common.config import Config, DPConfig
from medfed.common.data import SiteData
from medfed.common.errors import ConfigError

__all__ = ["PrivateRound", "start_private_round"]

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
        return DPTraining(
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            max_physical_batch_size=self.dp.max_physical_batch_size,
            grad_sample_mode=self.dp.grad_sample_mode,
            secure_mode=self.secure_rng,
        )

    def epsilon_after(self, steps_taken: int) -> float:
        """The site's cumulative epsilon once the round has trained ``steps_taken`` steps; steps beyond the plan
        (never expected: the ledger holds the plan) are recorded too before the figure is computed."""
        if steps_taken <= self.plan.steps:
            return self.plan.epsilon_after
        logger.error("DP training took %d steps, %d planned; recording the excess", steps_taken, self.plan.steps)
        excess = LedgerEntry.new(self.run_id, self.server_round, self.plan.noise_multiplier, self.plan.sample_rate,
                                 steps_taken - self.plan.steps)
        return epsilon_spent(_record(self.ledger, self.state, [excess]), self.plan.delta, self.dp.accountant)


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
    problem = secure_rng_problem(select_device()) if secure else None
    if problem:  # before the ledger: a refused round spends nothing
        asked = "this hospital's site config (secure_rng: true)" if cap.secure_rng else "privacy.secure_mode=true"
        fix = ("install torchcsprng, or set secure_rng: false in site.yaml for experiments" if cap.secure_rng
               else "install torchcsprng at every hospital, or run with privacy.secure_mode=false for experiments")
        raise ConfigError(f"{asked} asks for DP noise from a cryptographically secure RNG, but {problem}; so this "
                          f"hospital does not train with privacy=dp. To train: {fix}.")
    ledger = PrivacyLedger(env.state_dir, ledger_key(site))
    with ledger.locked():  # what was spent, the plan and its record: one step for every process on this ledger
        absorb_older(ledger, PrivacyLedger(env.state_dir, dataset_fingerprint(site)))  # keyed by the data's bytes
        entries = ledger.record(entries_from_state(state.ledger_entries()))
        plan = plan_round(
            dp,
            cap,
            n_train=len(site.train),
            batch_size=cfg.train.batch_size,
            local_epochs=cfg.train.local_epochs,
            rounds_left=cfg.train.rounds - server_round + 1,
            entries=entries,
            run_id=run_id,
        )
        entry = LedgerEntry.new(run_id, server_round, plan.noise_multiplier, plan.sample_rate, plan.steps)
        _record(ledger, state, [entry])
    return PrivateRound(plan, ledger, state, dp, secure, run_id, server_round)
