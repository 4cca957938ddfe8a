"""Personalisation at a hospital: layers it keeps to itself, local fine-tuning, and (simulation) poisoned updates.

- **Local layers** (``personalize.local_layers``): FedBN-style normalisation layers (``norm``), a FedPer-style
  classifier head (``head``) or both stay at the hospital. Their trained values live in Flower's ``context.state``
  between rounds (the ClientApp keeps them there; this module knows no Flower type) and in the hospital's state
  directory, so a coordinator restart or ``--resume`` finds them and are laid over each new global model; the reply carries, for those layers, the values the
  hospital *received*, so the hospital's own never leave it and every strategy aggregates the same set of arrays.
- **Fine-tuning** (``personalize.finetune_epochs``): after the last round a hospital trains its personalised model
  for a few more epochs on its training split and keeps the epoch (0 included: no fine-tuning) with the best
  validation AUC; only the metrics leave.
- **Poisoned updates** (``federation.attack``): for robustness experiments, the first ``federation.attackers``
  *simulated* hospitals send a scaled or random update. Deployed hospitals never do (they have no partition id).
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

from medfed.common.config import FederationConfig
from medfed.common.errors import IncompatibleUpdateError
from medfed.common.metrics import selection_key  # one model-selection rule for rounds and epochs
from medfed.common.models.weights import load_checkpoint, save_checkpoint

__all__ = [
    "FineTuned",
    "KeptLayersFile",
    "finetune",
    "keep_local_layers",
    "local_layer_names",
    "poison",
    "restore_local_layers",
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


def poison(
    state: dict[str, torch.Tensor],
    received: Mapping[str, np.ndarray],
    federation: FederationConfig,
    partition_id: int | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The update a simulated attacker sends instead of ``state`` (unchanged for honest or deployed hospitals)."""
    if federation.attack == "none" or partition_id is None or partition_id >= federation.attackers:
        return state
    generator = torch.Generator().manual_seed(seed)
    poisoned = {}
    for name, value in state.items():
        start = torch.as_tensor(np.asarray(received[name]), dtype=value.dtype)
        if not value.is_floating_point():
            poisoned[name] = value
        elif federation.attack == "scale":
            poisoned[name] = start + federation.attack_scale * (value - start)
        else:  # noise
            poisoned[name] = start + federation.attack_scale * torch.randn(value.shape, generator=generator)
    logger.warning("simulated attacker (partition %d): sending a %s update", partition_id, federation.attack)
    return poisoned


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
