"""Training defaults that a run's privacy or task picks: ``privacy=dp`` for models whose head alone trains on fixed
features, ``privacy=distributed_dp``, and self-supervised pretraining (``task=ssl``, :data:`SSL_RECIPE`).

DP-SGD wants other settings than plain training: few trainable weights, large (for a small site: full) batches, so
that the noise, which is the same whatever the batch, is small beside the batch's summed gradient; plain SGD with
momentum and a large step on clipped gradients; few rounds, since every step spends privacy. A hospital with fewer
training images than ``train.batch_size`` takes full-batch steps (its Poisson sampling rate is then 1; see
:func:`medfed.client.privacy.plan_round` for sites whose cap allows even less).

The values below were chosen on the federated *validation* AUC of BreastMNIST and PneumoniaMNIST at epsilon 8
(docs/benchmarks.md names the configurations tried). They apply under ``privacy=dp`` with ``model=scatternet`` or
``model.finetune=linear_probe``, and only to keys the overrides do not name: an explicit ``train.lr=...`` wins.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from medfed.common.config.config_file import override_key

if TYPE_CHECKING:
    from medfed.common.config.schema import Config

__all__ = ["DISTRIBUTED_DP_RECIPE", "HEAD_DP_RECIPE", "SSL_RECIPE", "with_private_recipe"]

logger = logging.getLogger(__name__)

HEAD_DP_RECIPE: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1.0,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "batch_size": 256,
    "rounds": 20,
    "local_epochs": 1,
}
"""``train.*`` defaults of a DP run whose head alone trains (model=scatternet, model.finetune=linear_probe)."""


DISTRIBUTED_DP_RECIPE: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1.0,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "rounds": 20,
    "local_epochs": 1,
}
"""``train.*`` defaults of ``privacy=distributed_dp`` (any model): the coordinator's step along each round's noised
mean gradient is SGD with momentum (one step per round, so few rounds: each spends privacy)."""


SSL_RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "lr": 3e-3,
    "rounds": 10,
}
"""``train.*`` defaults of self-supervised pretraining (``task=ssl``) without DP-SGD: SimCLR contrasts each image
with the rest of its batch, so it wants large batches, a larger step and more rounds than supervised training
(docs/benchmarks.md, "Label scarcity"); masked image modelling takes the same."""


def _named_keys(overrides: Iterable[str]) -> set[str]:
    return {override_key(o) for o in overrides if "=" in o}


def _epochs_under_dp_sgd(cfg: Config, overrides: Iterable[str]) -> Config:
    """Under ``privacy=dp`` / ``distributed_dp`` a round's local work is counted in epochs (the privacy plan and its
    accountant count Poisson-sampled epochs): the default ``train.local_epochs=0`` (count in steps) becomes 1 there,
    and an explicit ``train.local_steps`` is refused with the key to use instead."""
    from medfed.common.config.privacy import DPConfig
    from medfed.common.errors import ConfigError

    if not isinstance(cfg.privacy, DPConfig) or cfg.train.local_epochs > 0:
        return cfg
    if "train.local_steps" in _named_keys(overrides):
        raise ConfigError(f"train.local_steps={cfg.train.local_steps} does not apply under privacy={cfg.privacy.name}:"
                          " DP-SGD's privacy plan counts a round's work in Poisson-sampled epochs. Use "
                          "train.local_epochs=N instead (default 1 under DP).")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_epochs=1))


def with_private_recipe(cfg: Config, overrides: Iterable[str]) -> Config:
    """``cfg`` with :data:`HEAD_DP_RECIPE` for every ``train`` key the overrides leave at its default, when the run
    is ``privacy=dp`` over a head-only model, with :data:`DISTRIBUTED_DP_RECIPE` under ``privacy=distributed_dp``, or
    with :data:`SSL_RECIPE` for ``task=ssl`` without DP-SGD; ``cfg`` itself otherwise. Under DP-SGD the local work
    is counted in epochs (:func:`_epochs_under_dp_sgd`)."""
    from medfed.common.config.choices import Optimizer
    from medfed.common.config.privacy import DPConfig

    cfg = _epochs_under_dp_sgd(cfg, overrides)
    head_only = cfg.model.name == "scatternet" or cfg.model.finetune == "linear_probe"
    if cfg.privacy.name == "distributed_dp":
        recipe = DISTRIBUTED_DP_RECIPE
    elif cfg.privacy.name == "dp" and head_only and cfg.task == "classify":
        recipe = HEAD_DP_RECIPE
    elif cfg.task == "ssl" and not isinstance(cfg.privacy, DPConfig):
        recipe = SSL_RECIPE
    else:
        return cfg
    named = _named_keys(overrides)
    if "train" in named:  # a whole train group chosen by name: its values stand
        return cfg
    changes = {k: v for k, v in recipe.items() if f"train.{k}" not in named}
    if "optimizer" in changes:
        changes["optimizer"] = Optimizer(changes["optimizer"])
    if not changes:
        return cfg
    logger.debug("privacy=%s recipe: %s", cfg.privacy.name, changes)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
