"""A hospital's round under ``privacy=distributed_dp`` (issue 20): plan, check, record, then send its share.

The run's plan (:func:`medfed.common.distributed_plan.plan_distributed`) is a function of the run config and the model's size only, so the
coordinator and every hospital compute the same one, and no hospital takes the coordinator's word for it: the noise
multiplier of the sum (the least with which ``train.rounds`` Skellam steps and the run's metered evaluations spend
at most ``privacy.target_epsilon``), the power-of-two scale to integers, and the SecAgg+ range.

Each round the hospital (:func:`distributed_round`):

1. checks that its reply will be masked by SecAgg+ with the settings the plan needs (a train message outside the
   protocol, a sum over fewer hospitals than the run's worst case, or another integer range is refused: a share
   alone carries only part of the noise);
2. checks its own cap and records the round in its ledger before touching the data (the whole remaining run, with
   its evaluations, must fit under the cap; a site whose ``min_noise`` exceeds the plan's adds that much noise by
   itself);
3. samples its training images (Poisson, rate ``privacy.sample_rate``), sums their clipped, scaled, rounded
   per-sample gradients (:func:`~medfed.client.integer_gradients.integer_gradient_sum`), adds its Skellam share
   drawn from the operating system's CSPRNG (:class:`~medfed.client.secure_random.SecureRandom`), and encodes it
   for the transport, counting what the range clipped.

What the reply carries besides the masked integers: the site's epsilon, delta and noise multiplier, the number of
values the range clipped, and once per run its training split's noised size (charged like an evaluation; exact
only under ``privacy.exact_metrics``), from which the coordinator computes the expected number of images in a round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from medfed.client.dp_round import _record, _site_ledger, _spent, metered, planned_evaluations, release_train_count
from medfed.client.frozen_features import frozen_head
from medfed.client.integer_gradients import IntegerSum, integer_gradient_sum, noised_contribution
from medfed.client.ledger import SKELLAM, LedgerEntry
from medfed.client.node import NodeEnv, NodeState
from medfed.client.privacy import epsilon_spent
from medfed.client.secure_random import SecureRandom
from medfed.client.training import derive_seed, select_device
from medfed.common import keys
from medfed.common.config import Config, DistributedDPConfig
from medfed.common.data import SiteData
from medfed.common.distributed_plan import DistributedPlan, plan_distributed
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded

__all__ = ["Contribution", "SecAggSettings", "distributed_round", "trainable_dim"]

logger = logging.getLogger(__name__)

OVERFLOW = keys.INTEGER_OVERFLOW  # reply metric: values of this hospital's sum the SecAgg+ range clipped


def _entry(plan: DistributedPlan, run_id: int, server_round: int, *, noise: float, steps: int = 1) -> LedgerEntry:
    """The ledger entry of ``steps`` rounds of ``plan`` at ``noise`` (the plan's, or more where the site adds it)."""
    l2, l1 = plan.sensitivity
    return LedgerEntry.new(run_id, server_round, noise, plan.sample_rate, steps, mechanism=SKELLAM, l2=l2, l1=l1)


def trainable_dim(model: torch.nn.Module) -> int:
    """The number of weights a distributed-DP round sums gradients of."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class SecAggSettings:
    """What Flower's SecAgg+ mod at this node was set up with for this round (its state after the setup stage)."""

    sample_num: int
    peers: int  # nodes whose public keys this node received
    clipping_range: float
    target_range: int
    mod_range: int
    max_weight: float


def _check_secagg(secagg: SecAggSettings | None, plan: DistributedPlan, dp: DistributedDPConfig) -> None:
    """Refuse to send a share that SecAgg+ would not hide among enough others, or would not carry exactly."""
    if secagg is None:
        raise ConfigError(
            "This train message of a privacy=distributed_dp run did not come through SecAgg+, so the coordinator "
            "would see this hospital's sum with only its share of the noise; the hospital does not answer. Run "
            "the coordinator with medfed's distributed-DP workflow.")
    least = plan.hospitals - dp.max_dropouts
    if min(secagg.sample_num, secagg.peers) < least:
        raise ConfigError(
            f"SecAgg+ was set up to sum {secagg.sample_num} hospitals ({secagg.peers} keys received), fewer than the "
            f"{least} this run's noise shares need (federation.hospitals={plan.hospitals}, privacy.max_dropouts="
            f"{dp.max_dropouts}); the hospital does not send its share.")
    if secagg.sample_num > plan.hospitals:
        raise ConfigError(
            f"SecAgg+ was set up to sum {secagg.sample_num} hospitals, more than the {plan.hospitals} this run's "
            "integer range is planned for (federation.hospitals): the sum could wrap around the modulus. The "
            "coordinator must set federation.hospitals to the number of hospitals in the run.")
    transport = plan.transport
    expected = (transport.clipping_range, transport.quantization_range, transport.modulus_range, 1.0)
    got = (secagg.clipping_range, secagg.target_range, secagg.mod_range, secagg.max_weight)
    if tuple(float(x) for x in got) != tuple(float(x) for x in expected):
        raise ConfigError(
            f"SecAgg+ was set up with (clipping range, quantization range, modulus, max weight) {got}, not the "
            f"{expected} this run's integers need to travel exactly; the hospital does not send its share.")


def _sampled(n: int, rate: float, rng: SecureRandom) -> np.ndarray:
    """The indices of a Poisson sample of rate ``rate`` (each image on its own, from the secure source)."""
    if rate >= 1.0:
        return np.arange(n)
    return np.flatnonzero(rng.random(n) < rate)


@dataclass(frozen=True)
class Contribution:
    """What a hospital hands SecAgg+ (floats that encode integers) and the scalars it sends beside them."""

    values: np.ndarray
    metrics: dict[str, float | int]


def distributed_round(
    cfg: Config, site: SiteData, model: torch.nn.Module, env: NodeEnv, state: NodeState, *, run_id: int,
    server_round: int, secagg: SecAggSettings | None, feature_cache: Path | None = None,
) -> Contribution:
    """This hospital's contribution to round ``server_round`` (see the module's text for the steps)."""
    dp = cfg.privacy
    assert isinstance(dp, DistributedDPConfig)  # (the ClientApp routes only such runs here)
    plan = plan_distributed(cfg, trainable_dim(model))
    _check_secagg(secagg, plan, dp)
    cap = env.cap(cfg.federation)
    delta = min(dp.delta, cap.max_delta)
    noise = max(plan.noise_multiplier, cap.min_noise)
    l2, _ = plan.sensitivity
    # a site that wants more noise than the plan adds all of it itself (it then needs no other hospital's share)
    share = plan.share_variance if noise == plan.noise_multiplier else max(plan.share_variance, (noise * l2) ** 2)
    rounds_left = max(1, cfg.train.rounds - server_round + 1)
    ledger = _site_ledger(env, site)
    with ledger.locked():
        entries = _spent(ledger, env, site, state)
        reserved = planned_evaluations(cfg, dp, env, run_id=run_id, server_round=server_round, entries=entries)
        before = epsilon_spent(entries, delta)
        whole = epsilon_spent([*entries, _entry(plan, run_id, server_round, steps=rounds_left, noise=noise),
                               *reserved], delta)
        if not whole <= cap.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"Privacy cap reached: the run's {rounds_left} remaining distributed-DP rounds (noise multiplier "
                f"{noise:.3g}) with its noised evaluations would raise the hospital's epsilon from {before:.3g} to "
                f"{whole:.3g} (delta {delta:g}), above its cap {cap.max_epsilon:g}; it does not train in this run. "
                "To take part, the hospital must raise its own cap (max-epsilon), or the coordinator must plan a "
                "smaller target_epsilon or fewer rounds.")
        entry = _entry(plan, run_id, server_round, noise=noise)
        after = epsilon_spent(_record(ledger, state, [entry]), delta)
    if len(site.train) * plan.sample_rate > dp.max_site_images:  # (the count stays in the site's own log)
        logger.warning("about %d images per round here, more than privacy.max_site_images=%d that the integer "
                       "scale was planned for: values may lie outside the SecAgg+ range (they are clipped and "
                       "counted)", round(len(site.train) * plan.sample_rate), dp.max_site_images)
    rng = SecureRandom()
    total = _integer_sum(cfg, site, model, plan, _sampled(len(site.train), plan.sample_rate, rng), feature_cache,
                         batch=dp.max_physical_batch_size)
    values, overflow = noised_contribution(total, share, plan.transport, rng)
    if overflow:
        logger.warning("%d values of this round's sum lay outside the SecAgg+ range and were clipped", overflow)
    metrics: dict[str, float | int] = {
        keys.NUM_EXAMPLES: 1,  # SecAgg+'s weight: the integers travel unweighted (max_weight 1)
        keys.EPSILON: after, keys.EPSILON_CHARGED: after - before, keys.DELTA: delta,
        keys.NOISE_MULTIPLIER: noise, OVERFLOW: overflow,
    }
    if metered(cfg, env) is None:
        metrics[keys.N_TRAIN] = len(site.train)
    else:
        try:
            sized = release_train_count(cfg, dp, site, env, state, run_id=run_id, server_round=server_round)
        except PrivacyBudgetExceeded:
            logger.warning("no room under the cap for the training split's noised size; sent without it")
            sized = None
        if sized is not None:
            metrics[keys.NOISED_TRAIN_COUNT] = sized[0]
            metrics[keys.EPSILON] = sized[1].epsilon_after
            metrics[keys.EPSILON_CHARGED] = sized[1].epsilon_after - before
    return Contribution(values, metrics)


def _integer_sum(cfg: Config, site: SiteData, model: torch.nn.Module, plan: DistributedPlan, chosen: np.ndarray,
                 feature_cache: Path | None, *, batch: int) -> IntegerSum:
    """The sampled images' integer gradient sum, on the cached features when the model has a fixed front end,
    ``batch`` images per backward pass (memory only: the sample is ``chosen``)."""
    module, data = model, site.train
    frozen = frozen_head(model, site.train, views=cfg.train.aug_views, augment=cfg.train.augment,
                         spatial_dims=site.info.spatial_dims, seed=derive_seed(cfg.train.seed, "views"),
                         cache_dir=feature_cache, device=select_device(cfg.train.device))
    if frozen is not None:
        module, data = frozen.head, frozen.data
    module.train()
    values = np.zeros(plan.dim, dtype=np.int64)
    images = clipped = 0
    for start in range(0, len(chosen), batch):
        part = chosen[start:start + batch]
        summed = integer_gradient_sum(module, torch.from_numpy(np.asarray(data.images[part], dtype=np.float32)),
                                      torch.from_numpy(np.asarray(data.labels[part])).long(), clip=plan.clip,
                                      scale=plan.scale)
        values += summed.values
        images += summed.images
        clipped += summed.clipped
    logger.info("distributed-DP round: %d images summed, %d of them clipped", images, clipped)
    return IntegerSum(values, images, clipped)
