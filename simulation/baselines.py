"""The two baselines a reviewer always asks for, on the same config, model and training budget as a federation.

* centralized: every hospital's training split pooled into one model; one "round" is the work of all the
  hospitals' rounds: ``train.local_steps`` steps times the number of hospitals (as many images as the federation
  trains on per round), or ``train.local_epochs`` epochs of the pooled data (each hospital passes over its own
  split once per epoch); evaluated after each round on every hospital's validation split
  (selection) and on the global test set (report). Under ``privacy=dp`` (and ``distributed_dp``) it is pooled
  DP-SGD: Opacus on the union of the data, its noise planned as one hospital holding all of it would plan its run
  (:func:`medfed.client.privacy.plan_round`: ``privacy.target_epsilon`` over the whole run, no cap, no
  evaluations reserved: the pooled reference evaluates exactly), its epsilon reported per round.
* local: each hospital alone, the same steps (or epochs) per round as in the federation, its own model selected on
  its own validation split (under ``privacy=dp``: DP-SGD at each hospital on its own data, planned the same way).

Both write the same files as ``medfed simulate`` (server.runs), so results compare side by side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.client.dp_round import plan_recipe, plan_training
from medfed.client.privacy import RoundPlan, SiteCap, costed, epsilon_spent, plan_round
from medfed.client.training import (
    DPTraining,
    configure_threads,
    derive_seed,
    make_optimizer,
    round_work,
    select_device,
    train_epochs,
)
from medfed.common.config import Config, DPConfig, TrainConfig
from medfed.common.data import ArrayDataset, DatasetInfo, SiteData, load_site, load_test_set
from medfed.common.hardware import configure_backend
from medfed.common.inference import evaluate
from medfed.common.models import build_model
from medfed.common.models.pretrained import load_pretrained
from medfed.server.runs import RunDirectory
from medfed.server.tracking import RunTracker, SiteRound

__all__ = ["run_centralized", "run_local"]

logger = logging.getLogger(__name__)


def _sites(cfg: Config, cache_dir: Path) -> list[SiteData]:
    return [load_site(cfg, i, cache_dir=cache_dir) for i in range(cfg.federation.hospitals)]


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _timed_eval(model: torch.nn.Module, data: ArrayDataset, cfg: Config) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    metrics = evaluate(model, data.images, data.labels, batch_size=cfg.train.eval_batch_size,
                       device=select_device(cfg.train.device))
    return metrics, time.perf_counter() - started


def run_centralized(cfg: Config, run_dir: RunDirectory, *, cache_dir: Path, t0: float | None = None) -> dict:
    """Train one model on all hospitals' training data pooled; returns the summary."""
    t0 = t0 if t0 is not None else time.time()
    configure_threads(cfg.federation.threads, 1)
    sites = _sites(cfg, cache_dir)
    info, test_set = load_test_set(cfg)
    pooled = ArrayDataset.concat([s.train for s in sites])
    device = select_device(cfg.train.device)
    configure_backend(device, cudnn_benchmark=True)
    model = initial_model(cfg, info).to(device)
    optimizer = make_optimizer(model, cfg.train)
    private = _pooled_dp(cfg, len(pooled))
    cfg.tracking.require_runtime()
    tracker = RunTracker(run_dir, mode="centralized", total_rounds=cfg.train.rounds, t0=t0,
                         tensorboard=cfg.tracking.tensorboard, patience=cfg.train.patience)
    recipe = private.recipe(cfg.train) if private is not None else cfg.train
    trained_rounds = 0
    for server_round in range(1, cfg.train.rounds + 1):
        result = None
        if private is None or (server_round - 1) % private.plan.period == 0:
            result = train_epochs(
                model, pooled, recipe, **round_work(recipe, server_round, private=private is not None,
                                                    sites=len(sites)),
                n_classes=info.n_classes, spatial_dims=info.spatial_dims,
                seed=derive_seed(cfg.train.seed, server_round, "centralized"), optimizer=optimizer, device=device,
                privacy=private.training if private is not None else None,
            )
            trained_rounds += 1
        epsilon = private.epsilon(trained_rounds) if private is not None else None
        rounds: dict[str, SiteRound] = {}
        for site in sites:
            val, eval_s = _timed_eval(model, site.val, cfg)
            rounds[site.site_id] = SiteRound(
                n_train=len(site.train), n_val=len(site.val), train_loss=result.loss if result else None,
                eval_s=eval_s, val=val, epsilon=epsilon, delta=private.plan.delta if private is not None else None,
            )
        test, test_s = _timed_eval(model, test_set, cfg)
        tracker.record_round(
            server_round, sites=rounds, test=test, arrays=_numpy_state(model),
            server_s=(result.seconds if result else 0.0) + test_s,
        )
        if tracker.stopped_early is not None:
            break
    return tracker.finish(_numpy_state(model))


@dataclass(frozen=True)
class _PooledDP:
    """Pooled DP-SGD's plan: the noise and steps one hospital holding the union of the data would plan."""

    plan: RoundPlan
    training: DPTraining

    def recipe(self, train: TrainConfig) -> TrainConfig:
        return plan_recipe(self.plan, train)

    def epsilon(self, trained_rounds: int) -> float:
        """Epsilon after ``trained_rounds`` rounds of the plan."""
        return epsilon_spent([costed(self.plan.noise_multiplier, self.plan.sample_rate,
                                     self.plan.steps * trained_rounds)], self.plan.delta)


def _pooled_dp(cfg: Config, n_train: int) -> _PooledDP | None:
    """The DP plan of ``n_train`` images trained on in one place (the pooled data, or one hospital's in the local
    baseline) under ``privacy=dp`` / ``distributed_dp``; None without DP."""
    dp = cfg.privacy
    if not isinstance(dp, DPConfig):
        return None
    plan = plan_round(dp, SiteCap(max_delta=dp.delta), n_train=n_train, batch_size=cfg.train.batch_size,
                      local_epochs=cfg.train.dp_epochs, rounds_left=cfg.train.rounds, entries=[], run_id=0,
                      reserved=[], server_round=1)
    logger.info("pooled DP-SGD: noise multiplier %.4g, sampling rate %.4g, %d steps per round, every %d round(s)",
                plan.noise_multiplier, plan.sample_rate, plan.steps, plan.period)
    return _PooledDP(plan, plan_training(plan, dp, secure_mode=dp.secure_mode))


def initial_model(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """The model a run starts from: seeded like the federated run's, then the pretrained weights if any."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, spatial_dims=info.spatial_dims, in_channels=info.channels, n_classes=info.n_classes)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    return model


def run_local(cfg: Config, run_dir: RunDirectory, *, cache_dir: Path, t0: float | None = None) -> dict:
    """Train each hospital's model on its own data only; returns the summary."""
    t0 = t0 if t0 is not None else time.time()
    configure_threads(cfg.federation.threads, 1)
    sites = _sites(cfg, cache_dir)
    info, test_set = load_test_set(cfg)
    device = select_device(cfg.train.device)
    configure_backend(device, cudnn_benchmark=True)
    models, optimizers = [], []
    for site in sites:
        model = initial_model(cfg, info).to(device)  # every hospital starts from the same model, as in FedAvg
        models.append(model)
        optimizers.append(make_optimizer(model, cfg.train))
    privates = [_pooled_dp(cfg, len(site.train)) for site in sites]  # each hospital's own DP-SGD plan
    trained = [0] * len(sites)
    cfg.tracking.require_runtime()
    tracker = RunTracker(run_dir, mode="local", total_rounds=cfg.train.rounds, t0=t0,
                         tensorboard=cfg.tracking.tensorboard, patience=cfg.train.patience)
    for server_round in range(1, cfg.train.rounds + 1):
        rounds: dict[str, SiteRound] = {}
        for index, (site, model, optimizer) in enumerate(zip(sites, models, optimizers, strict=True)):
            private = privates[index]
            recipe = private.recipe(cfg.train) if private is not None else cfg.train
            result = None
            if private is None or (server_round - 1) % private.plan.period == 0:
                result = train_epochs(
                    model, site.train, recipe, **round_work(recipe, server_round, private=private is not None),
                    n_classes=info.n_classes, spatial_dims=info.spatial_dims,
                    seed=derive_seed(cfg.train.seed, server_round, site.site_id), optimizer=optimizer, device=device,
                    privacy=private.training if private is not None else None,
                )
                trained[index] += 1
            val, eval_s = _timed_eval(model, site.val, cfg)
            test, test_s = _timed_eval(model, test_set, cfg)
            rounds[site.site_id] = SiteRound(
                n_train=len(site.train), n_val=len(site.val), train_loss=result.loss if result else None,
                train_s=result.seconds if result else 0.0, eval_s=eval_s + test_s, val=val, test=test,
                epsilon=private.epsilon(trained[index]) if private is not None else None,
                delta=private.plan.delta if private is not None else None,
            )
        mean_test = {}
        for key in ("auc", "acc"):
            values = [r.test[key] for r in rounds.values() if r.test is not None and np.isfinite(r.test[key])]
            mean_test[key] = float(np.mean(values)) if values else float("nan")
        tracker.record_round(server_round, sites=rounds, test=mean_test, arrays=None)
        if tracker.stopped_early is not None:
            break
    return tracker.finish(None)
