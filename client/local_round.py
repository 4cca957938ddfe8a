"""One training round at a hospital: the received global model trained on the site's own training split.

Under ``privacy=dp`` the round is planned and recorded first (:mod:`medfed.client.dp_round`); with
personalisation the hospital's own layers are laid over the global model and kept back from the reply
(:mod:`medfed.client.personalization`); a simulated attacker's reply is poisoned (:mod:`medfed.client.attacks`).
The result is plain Python: the weights to send and the scalar metrics; the adapter turns them into a Message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from medfed.client.attacks import poison
from medfed.client.dp_round import metered, release_train_count, start_private_round
from medfed.client.node import NodeEnv, NodeState
from medfed.client.personalization import (
    keep_local_layers,
    kept_layers,
    local_layer_names,
    restore_local_layers,
    save_kept_layers,
    shared_state,
)
from medfed.client.training import derive_seed, round_work, select_device, train_epochs
from medfed.common import keys
from medfed.common.compression import compress_update
from medfed.common.config import Config, DPConfig
from medfed.common.data import SiteData
from medfed.common.errors import PrivacyBudgetExceeded
from medfed.common.models.ssl import MeanLoss

__all__ = ["RoundResult", "train_round"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What a training round sends: the weights (state-dict order) and the scalar metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


def train_round(
    cfg: Config,
    site: SiteData,
    model: torch.nn.Module,
    env: NodeEnv,
    state: NodeState,
    *,
    run_id: int,
    server_round: int,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Train the received global model on this hospital's training split for ``train.local_steps`` steps
    (or ``train.local_epochs`` epochs).

    With ``privacy=dp`` the site first plans the round under its own cap (refusing with a PHI-free reason when
    the round would pass it), records the round in its ledger, then trains with Opacus DP-SGD. A metered DP round
    (:func:`~medfed.client.dp_round.metered`) sends no training loss, exact count or timing: ``num-examples`` is
    1, beside the site's epsilon, delta and noise multiplier, and once per run the training split's noised size
    (charged like an evaluation), which the coordinator uses as the site's FedAvg weight.
    """
    dp = cfg.privacy if isinstance(cfg.privacy, DPConfig) else None
    private = (start_private_round(cfg, dp, site, env, state, run_id=run_id, server_round=server_round)
               if dp is not None else None)
    received = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    local = local_layer_names(model, cfg.personalize.local_layers)
    if local:  # personalisation: this hospital's own layers over the new global model
        restore_local_layers(model, kept_layers(env, state, site.site_id, server_round), local)
    recipe = private.recipe(cfg.train) if private is not None else cfg.train  # the site's DP plan may adapt it
    result = train_epochs(
        model,
        site.train,
        recipe,
        **round_work(recipe, server_round, private=private is not None),
        n_classes=site.info.n_classes,
        spatial_dims=site.info.spatial_dims,
        seed=derive_seed(cfg.train.seed, server_round, site.site_id),
        device=select_device(cfg.train.device),
        privacy=private.training() if private is not None else None,
        proximal_mu=proximal_mu,
        criterion=MeanLoss() if cfg.task == "ssl" else None,
        feature_cache=env.state_dir / "features",  # fixed front ends: features computed once, kept at the site
    )
    model.cpu()
    if local:
        save_kept_layers(env, state, site.site_id, keep_local_layers(model, local), server_round)
    weights = poison(  # a simulated attacker's update (robustness experiments); the trained weights otherwise
        shared_state(model, received, local), received, cfg.federation, env.partition_id,
        derive_seed(cfg.train.seed, "attack", server_round),
    )
    if cfg.strategy.compression != "none":  # the update in fewer bytes; the coordinator decodes it (after DP's noise)
        weights = {name: torch.from_numpy(array) for name, array in compress_update(
            {k: v.numpy() for k, v in weights.items()}, received, cfg.strategy.compression,
            seed=derive_seed(cfg.train.seed, "compress", server_round, site.site_id)).items()}
    metrics: dict[str, float | int] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.loss,
        keys.TRAIN_TIME_S: result.seconds,
        keys.N_TRAIN: len(site.train),
    }
    if private is not None:
        metrics.update({keys.EPSILON: private.epsilon_after(result.steps), keys.DELTA: private.plan.delta,
                        keys.NOISE_MULTIPLIER: private.plan.noise_multiplier})
        metrics[keys.EPSILON_CHARGED] = float(metrics[keys.EPSILON]) - private.plan.epsilon_before
        if dp is not None and metered(cfg, env) is not None:  # only the accounting and noised numbers leave
            metrics = {keys.NUM_EXAMPLES: 1, **{k: metrics[k] for k in _ACCOUNTING}}
            try:  # (the plan reserved it; only another run spending meanwhile can leave no room)
                sized = release_train_count(cfg, dp, site, env, state, run_id=run_id, server_round=server_round)
            except PrivacyBudgetExceeded:  # the trained update still goes; the coordinator weighs it by the mean
                logger.warning("no room under the cap for the training split's noised size; sent without it")
                sized = None
            if sized is not None:  # once per run: the coordinator's FedAvg weight for this site
                metrics[keys.NOISED_TRAIN_COUNT] = sized[0]
                metrics[keys.EPSILON] = sized[1].epsilon_after
                metrics[keys.EPSILON_CHARGED] = sized[1].epsilon_after - private.plan.epsilon_before
    return RoundResult(weights, metrics)


# what a metered DP round sends besides its weights: num-examples 1 (the coordinator weighs the site by its noised
# training-set size, sent once per run) and the accounting the site states anyway (epsilon, delta, noise)
_ACCOUNTING = (keys.EPSILON, keys.EPSILON_CHARGED, keys.DELTA, keys.NOISE_MULTIPLIER)
