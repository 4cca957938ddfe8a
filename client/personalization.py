"""Personalisation at a hospital: layers it keeps to itself, local fine-tuning, and the ensemble of its models.

- **Local layers** (``personalize.local_layers``): FedBN-style normalisation layers (``norm``), a FedPer-style
  classifier head (``head``) or both stay at the hospital. Their trained values live in Flower's ``context.state``
  between rounds (the ClientApp keeps them there; this module knows no Flower type) and in the hospital's state
  directory, so a coordinator restart or ``--resume`` finds them and are laid over each new global model; the reply carries, for those layers, the values the
  hospital *received*, so the hospital's own never leave it and every strategy aggregates the same set of arrays.
- **Fine-tuning** (``personalize.finetune_epochs``): after the last round a hospital trains its personalised model
  for a few more epochs on its training split and keeps the epoch (0 included: no fine-tuning) with the best
  validation AUC; only the metrics leave.
- **Ensembles**: the evaluation of a personalising hospital scores the global, personalised and fine-tuned models
  and their mean (:func:`personalised_metrics`).

Simulated poisoned updates live in :mod:`medfed.client.attacks`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.client.node import NodeEnv, NodeState
from medfed.client.training import derive_seed, select_device, train_epochs
from medfed.common.config import Config
from medfed.common.data import SiteData, load_test_set
from medfed.common.inference import evaluate, predict_proba
from medfed.common.metrics import classification_metrics
from medfed.common.uncertainty import mean_proba
from medfed.common import keys
from medfed.common.errors import IncompatibleUpdateError
from medfed.common.metrics import selection_key  # one model-selection rule for rounds and epochs
from medfed.common.models.weights import load_checkpoint, save_checkpoint

__all__ = [
    "FineTuned",
    "KeptLayersFile",
    "finetune",
    "keep_local_layers",
    "local_layer_names",
    "kept_layers",
    "personalised_metrics",
    "restore_local_layers",
    "save_kept_layers",
    "shared_state",
]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*, InstanceNorm*
_HEAD = "head"  # every registered model names its classifier `head`


def local_layer_names(model: nn.Module, which: str) -> list[str]:
    """State-dict keys of the layers a hospital keeps: ``norm`` (normalisation layers), ``head`` (the classifier),
    ``norm_head`` (both) or ``none``.

    Raises:
        ValueError: the model has no such layers (the choice would silently personalise nothing).
    """
    if which == "none":
        return []
    modules = []
    for name, module in model.named_modules():
        if "norm" in which and isinstance(module, _NORM_TYPES):
            modules.append(name)
        if "head" in which and name == _HEAD:
            modules.append(name)
    names = [key for key in model.state_dict() if any(key.startswith(m + ".") for m in modules)]
    if not names:
        raise ValueError(
            f"personalize.local_layers={which} selects no layer of {type(model).__name__} (it has no "
            f"{'normalisation layers' if which == 'norm' else 'head'}); choose another personalize.local_layers."
        )
    return names


def restore_local_layers(model: nn.Module, kept: Mapping[str, torch.Tensor] | None, names: list[str]) -> bool:
    """Lay this hospital's kept layers over ``model`` (the new global one); False before it has any."""
    if kept is None:
        return False
    values = dict(kept)
    if sorted(values) != sorted(names):  # another model or choice than the one kept: start again from global
        logger.warning("kept local layers do not match personalize.local_layers; starting them from the global model")
        return False
    model.load_state_dict(values, strict=False)
    return True


def keep_local_layers(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The trained values of ``names``, to keep until the next round (the ClientApp keeps them in Flower's
    ``context.state``)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in names}


@dataclass(frozen=True)
class KeptLayersFile:
    """The kept layers on disk in the hospital's state directory, so a coordinator restart (which resumes the run
    as a new Flower run, with a fresh ``context.state``) does not lose them. One file per run and site; the name
    is a hash, so it reveals neither."""

    path: Path

    @classmethod
    def of(cls, state_dir: Path, run_key: str, site_id: str) -> KeptLayersFile:
        digest = hashlib.sha256(f"{run_key}\0{site_id}".encode()).hexdigest()[:24]
        return cls(Path(state_dir) / "personal" / f"{digest}.pt")

    def save(self, kept: Mapping[str, torch.Tensor], server_round: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.path, {k: v.numpy() for k, v in kept.items()}, {"round": server_round})

    def load_before(self, server_round: int) -> dict[str, torch.Tensor] | None:
        """The layers kept in an earlier round of this run, or None (none kept, or unreadable: start again)."""
        if server_round <= 1 or not self.path.is_file():
            return None
        try:
            arrays, meta = load_checkpoint(self.path)
        except IncompatibleUpdateError:
            logger.warning("kept local layers unreadable; starting them from the global model")
            return None
        if not int(meta.get("round", 0)) < server_round:
            return None
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def shared_state(model: nn.Module, received: Mapping[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
    """What a hospital sends: its trained weights, except the kept layers, which go back as received."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name in names:
        state[name] = torch.as_tensor(np.asarray(received[name]), dtype=state[name].dtype)
    return state


@dataclass(frozen=True)
class FineTuned:
    """The best fine-tuning epoch (0: the model as it came) and its validation metrics."""

    epoch: int
    val: dict[str, float]
    model: nn.Module


def finetune(
    model: nn.Module,
    epochs: int,
    train_one_epoch: Callable[[nn.Module, int], None],
    validate: Callable[[nn.Module], dict[str, float]],
) -> FineTuned:
    """Fine-tune a copy of ``model`` for ``epochs`` epochs; keep the epoch with the best validation AUC (ties and
    undefined AUCs: the lower validation loss), epoch 0 included, so fine-tuning never makes the choice worse on
    validation."""
    tuned = copy.deepcopy(model)
    best = FineTuned(epoch=0, val=validate(tuned), model=copy.deepcopy(tuned))
    for epoch in range(1, epochs + 1):
        train_one_epoch(tuned, epoch)
        val = validate(tuned)
        if selection_key(val) > selection_key(best.val):
            best = FineTuned(epoch=epoch, val=val, model=copy.deepcopy(tuned))
    return best


def kept_layers(env: NodeEnv, state: NodeState, site_id: str, server_round: int) -> dict[str, torch.Tensor] | None:
    """The layers this hospital keeps to itself: from the node's state, or, in the first round after a coordinator
    restart or ``--resume`` (a new Flower run), from its state directory; None in round 1."""
    kept = state.kept_layers()
    if kept is not None:
        return kept
    return KeptLayersFile.of(env.state_dir, env.run_key(), site_id).load_before(server_round)


def save_kept_layers(env: NodeEnv, state: NodeState, site_id: str, kept: dict[str, torch.Tensor],
                     server_round: int) -> None:
    """Keep this round's personal layers in the node's state and on the hospital's disk."""
    state.set_kept_layers(kept)
    KeptLayersFile.of(env.state_dir, env.run_key(), site_id).save(kept, server_round)


def personalised_metrics(
    cfg: Config, site: SiteData, model: nn.Module, env: NodeEnv, state: NodeState, server_round: int
) -> dict[str, float | int]:
    """The personalised model's metrics (global + kept layers), after the last round the fine-tuned one's, and
    the ensemble's (the mean of the global model's and these models' probabilities); on the validation split, and in
    simulation also on the global test set (a deployed hospital has none)."""
    device = select_device(cfg.train.device)
    test = load_test_set(cfg, cache_dir=env.cache_dir)[1] if env.simulated and cfg.evaluate.test_split else None
    members: list[tuple[np.ndarray, np.ndarray | None]] = []  # (validation, test) probabilities of each model

    def probabilities(candidate: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
        val = predict_proba(candidate, site.val.images, batch_size=cfg.train.eval_batch_size, device=device)
        tested = None if test is None else predict_proba(candidate, test.images,
                                                         batch_size=cfg.train.eval_batch_size, device=device)
        members.append((val, tested))
        return val, tested

    def scores(prefix: str, test_prefix: str, probs: tuple[np.ndarray, np.ndarray | None]) -> dict[str, float | int]:
        out = {f"{prefix}{k}": float(v) for k, v in classification_metrics(site.val.labels, probs[0]).items()}
        if test is not None and probs[1] is not None:
            out.update({f"{test_prefix}{k}": float(v)
                        for k, v in classification_metrics(test.labels, probs[1]).items()})
        return out

    def validate(candidate: nn.Module) -> dict[str, float]:
        return evaluate(candidate, site.val.images, site.val.labels, batch_size=cfg.train.eval_batch_size,
                        device=device)

    metrics: dict[str, float | int] = {}
    probabilities(model)  # the global model: the ensemble's first member
    local = local_layer_names(model, cfg.personalize.local_layers)
    if local:
        restore_local_layers(model, kept_layers(env, state, site.site_id, server_round + 1), local)
        metrics.update(scores(keys.PERSONAL_PREFIX, keys.PERSONAL_TEST_PREFIX, probabilities(model)))
    if cfg.personalize.finetune_epochs > 0 and server_round >= cfg.train.rounds:

        def train_one_epoch(candidate: nn.Module, epoch: int) -> None:
            train_epochs(candidate, site.train, cfg.train, epochs=1, n_classes=site.info.n_classes,
                         spatial_dims=site.info.spatial_dims,
                         seed=derive_seed(cfg.train.seed, "finetune", epoch, site.site_id), lr=cfg.train.lr,
                         device=device)
            candidate.cpu()

        tuned = finetune(model, cfg.personalize.finetune_epochs, train_one_epoch, validate)
        metrics.update(scores(keys.FINETUNED_PREFIX, keys.FINETUNED_TEST_PREFIX, probabilities(tuned.model)))
        metrics[keys.FINETUNED_EPOCH] = tuned.epoch
    if len(members) >= 2:
        ensemble = (mean_proba([v for v, _ in members]),
                    None if test is None else mean_proba([t for _, t in members if t is not None]))
        metrics.update(scores(keys.ENSEMBLE_PREFIX, keys.ENSEMBLE_TEST_PREFIX, ensemble))
    return metrics
