"""Local training at a hospital: pure torch + MONAI, no Flower imports.

The same loop trains a hospital's model in a federated round, the pooled centralized baseline and each hospital
alone in the local-only baseline, so every comparison uses one training core.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medfed.client.frozen_features import ViewMeanCrossEntropy, frozen_head, has_fixed_front_end
from medfed.common.config import AugmentConfig, TrainConfig
from medfed.common.data import ArrayDataset, build_batch_augmentation
from medfed.common.hardware import amp_dtype, needs_grad_scaler, resolve_device, use_channels_last

__all__ = [
    "DPTraining",
    "LocalTrainResult",
    "class_weights",
    "configure_threads",
    "derive_seed",
    "make_optimizer",
    "round_work",
    "select_device",
    "set_lr",
    "train_epochs",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainResult:
    """What one call of :func:`train_epochs` did (all scalars; nothing here identifies an image)."""

    loss: float  # mean per-sample training loss over all epochs of this call
    num_examples: int  # training samples (not batches): FedAvg's weight
    steps: int  # optimizer steps (with DP: logical batches the accountant counted)
    seconds: float
    sample_rate: float | None = None  # with DP: the Poisson sampling rate the accountant used


@dataclass(frozen=True)
class DPTraining:
    """Opacus DP-SGD settings of one training call (the noise comes from the site's privacy plan)."""

    noise_multiplier: float
    max_grad_norm: float
    max_physical_batch_size: int = 64
    grad_sample_mode: str = "hooks"
    secure_mode: bool = False


@dataclass(frozen=True)
class _PrivateTraining:
    """What Opacus made of a training call: the wrapped model, the DP optimizer, the per-image loss, a source of
    each epoch's batches (Poisson-sampled, split to the physical batch size) and the accountant's history."""

    model: Any  # opacus.GradSampleModule or its ghost-clipping variant
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    epoch_batches: Callable[[], contextlib.AbstractContextManager[Iterator[tuple[torch.Tensor, torch.Tensor]]]]
    engine: Any  # opacus.PrivacyEngine: its accountant counts the steps taken

    def steps_and_rate(self) -> tuple[int, float | None]:
        """Optimizer steps the accountant counted, and the sampling rate it used (None before any step)."""
        history = self.engine.accountant.history
        return sum(n for _, _, n in history), (history[-1][1] if history else None)


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed derived deterministically from the parts (run seed, round, site ...)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def select_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names (``train.device``, which a deployed hospital's site config overrides): ``auto``
    (its GPU when it has one, else its CPU), ``cpu``, ``cuda`` or ``cuda:N``
    (:func:`~medfed.common.hardware.resolve_device`)."""
    return resolve_device(spec)


def configure_threads(threads: int, parallel: int) -> int:
    """Set torch's intra-op threads: ``threads`` if > 0, else the cores divided among ``parallel`` trainers."""
    count = threads if threads > 0 else max(1, (os.cpu_count() or 1) // max(1, parallel))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` (validated by the config schema), over the trainable parameters:
    the encoder's at ``lr x train.encoder_lr_scale`` (discriminative learning rates), the rest at ``lr``."""
    encoder = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    params = [{"params": group, "lr_scale": scale, "lr": cfg.lr * scale}
              for group, scale in ((encoder, cfg.encoder_lr_scale), (rest, 1.0)) if group]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def round_work(cfg: TrainConfig, server_round: int, *, private: bool = False, sites: int = 1) -> dict[str, Any]:
    """:func:`train_epochs`' work and rate arguments for round ``server_round`` of the recipe ``cfg``: its
    ``local_epochs`` epochs, or ``local_steps`` steps (times ``sites``: the centralized baseline does, per round, the
    steps of all the hospitals it pools), with the per-step rate of :meth:`TrainConfig.step_lr` (warm-up, schedule).
    DP-SGD (``private``) trains ``local_epochs`` Poisson-sampled epochs at the round's one rate."""
    if private:
        return {"epochs": cfg.dp_epochs, "lr": cfg.round_lr(server_round)}
    steps = 0 if cfg.local_epochs else cfg.local_steps * sites
    return {"epochs": cfg.local_epochs, "steps": steps, "step_lr": functools.partial(cfg.step_lr, server_round)}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate (a persistent optimizer following the round schedule); each parameter group keeps its
    ``lr_scale`` (the encoder's discriminative factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights against class imbalance: ``balanced`` = N / (C * count_c); None for ``none``.

    Classes absent from this hospital's training split get weight 1 (they contribute no samples anyway).
    """
    if mode == "none":
        return None
    counts = np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes, dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(weights, dtype=torch.float32)


def _batches(
    data: ArrayDataset, cfg: TrainConfig, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass in batches, each read by one indexing op (from memory, or from the site's disk cache)."""
    order = torch.randperm(len(data), generator=generator)
    if cfg.loader_workers == 0 and not cfg.pin_memory:
        labels = torch.from_numpy(data.labels)
        for start in range(0, len(data), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            yield torch.from_numpy(np.ascontiguousarray(data.images[idx.numpy()])), labels[idx]
        return
    # the same batches, read ahead by worker processes and/or into pinned memory (the site's loader settings)
    yield from torch.utils.data.DataLoader(_BatchedTensors(data), batch_size=cfg.batch_size,
                                           sampler=order.tolist(), collate_fn=_as_batched, **_loading(cfg))


def _loading(cfg: TrainConfig) -> dict[str, Any]:
    """A DataLoader's worker and memory options from ``train.loader_workers`` / ``train.pin_memory`` (a site's
    config sets them). Augmentation runs on whole batches after loading (:class:`BatchAugmentation`), so the
    workers only read; the batches' membership and order never depend on them."""
    # (pinned memory only speeds copies to a GPU; without one torch would warn and ignore it, at a cost)
    options: dict[str, Any] = {"num_workers": cfg.loader_workers,
                               "pin_memory": cfg.pin_memory and torch.cuda.is_available()}
    if cfg.loader_workers > 0:
        options["persistent_workers"] = False
    return options


def train_epochs(
    model: nn.Module,
    data: ArrayDataset,
    cfg: TrainConfig,
    *,
    epochs: int,
    n_classes: int,
    spatial_dims: int,
    seed: int,
    steps: int = 0,
    lr: float | None = None,
    step_lr: Callable[[float], float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | None = None,
    privacy: DPTraining | None = None,
    proximal_mu: float = 0.0,
    criterion: nn.Module | None = None,
    feature_cache: Path | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``data``, or for exactly ``steps`` optimizer steps when
    ``steps`` > 0 (reshuffled passes, the last one cut short; ``train.local_steps``; not with DP-SGD).

    A new optimizer is made unless one is passed (the centralized baseline keeps its optimizer across calls;
    a federated round starts fresh from the global weights); ``lr`` (the round's rate) overrides ``train.lr``, and
    ``step_lr`` (the share of the call's steps done, in (0, 1], to a rate; :meth:`TrainConfig.step_lr`) sets it
    before each step instead (not with DP-SGD, whose step count is random).
    Shuffling and augmentation are seeded by ``seed``. With ``privacy`` the same loop runs Opacus DP-SGD: Poisson
    sampling (an epoch is ``ceil(n / batch_size)`` logical batches), per-sample clipping and Gaussian noise, with
    logical batches split to ``max_physical_batch_size`` in memory. ``model`` itself stays unwrapped.
    ``proximal_mu`` > 0 adds FedProx's (mu / 2) * ||w - w_start||^2 to the loss (not with ``privacy``: Opacus
    builds updates from per-sample gradients, which leave the term out); the reported loss is the data loss.
    ``criterion`` replaces the cross-entropy (SSL models: the mean of the loss terms their forward returns).

    A model with a fixed front end (``model=scatternet``, ``model.finetune=linear_probe``) trains its head only, on
    the training split's features computed once (kept in ``feature_cache`` when given; :mod:`.frozen_features`),
    with ``train.aug_views`` views of each image averaged into its per-sample gradient (with ``train.augment``
    and one view, augmentation is drawn at every step instead and the features are not cached). ``train.ema_decay`` > 0
    leaves the model at the exponential moving average of its trainable weights over the call's steps (started at
    the call's initial weights: with few steps it damps the update).
    """
    if proximal_mu > 0 and privacy is not None:
        raise ValueError("train_epochs(): a proximal term and DP-SGD cannot be combined (see the docstring).")
    if privacy is not None and cfg.class_weighting != "none":
        raise ValueError("train_epochs(): class weights (computed from the training labels) and DP-SGD cannot be "
                         "combined (see TrainConfig.class_weighting).")
    if len(data) == 0:
        raise ValueError("train_epochs() got an empty training split; a site needs at least one image.")
    if privacy is not None and (steps > 0 or step_lr is not None):
        raise ValueError("train_epochs(): DP-SGD counts its work in Poisson-sampled epochs at one rate; steps= and "
                         "step_lr= are for non-private training.")
    started = time.perf_counter()  # everything local training does, optimizer set-up included
    device = device or select_device()
    model.to(device)
    model.train()
    optimizer = optimizer or make_optimizer(model, cfg)
    if lr is not None:
        set_lr(optimizer, lr)
    classification = criterion is None
    n_train = len(data)
    # fixed features once per site, unless the recipe augments every step (train.augment without aug_views): then
    # the images go through the fixed front end at each step, as through any model
    per_step_augmentation = cfg.augment.enabled and cfg.aug_views == 1
    frozen = frozen_head(model, data, views=cfg.aug_views, augment=cfg.augment, spatial_dims=spatial_dims,
                         seed=derive_seed(cfg.seed, "views"), cache_dir=feature_cache, device=device) \
        if classification and not per_step_augmentation else None
    trained: nn.Module = model
    if frozen is not None:  # the head alone, on the cached features (which take no image augmentation)
        trained, data = frozen.head, frozen.data
        cfg = dataclasses.replace(cfg, augment=AugmentConfig(enabled=False))
    if criterion is None:  # an SSL model brings its own criterion (its forward returns the loss terms)
        weights = class_weights(data.labels, n_classes, cfg.class_weighting)
        weight = None if weights is None else weights.to(device)
        criterion = (ViewMeanCrossEntropy(weight, reduction="mean") if frozen is not None
                     else nn.CrossEntropyLoss(weight=weight, reduction="mean"))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # train.augment: drawn at every step for each image of the batch, on the training device (the cached features
    # of a fixed front end take none: their views were drawn once)
    augment = build_batch_augmentation(cfg.augment, spatial_dims, seed=derive_seed(seed, "augment"))
    precision = amp_dtype(str(cfg.amp), device, dp=privacy is not None)  # (refused under DP before Opacus wraps)
    private = _make_private(trained, optimizer, criterion, data, cfg, seed, privacy) if privacy \
        else None
    forward: Callable[[torch.Tensor], Any] = private.model if private else trained
    if private is not None:
        optimizer, criterion = private.optimizer, private.criterion
    # DP-SGD builds each step from Opacus' per-sample gradients and replaces the batch gradient autograd would
    # put in p.grad, so when every layer trains, backward is asked for the gradient of the images instead: the
    # same module-output gradients reach Opacus' hooks, and the batch weight gradients are never computed (a
    # third of a plain backward pass). Frozen layers (their input gradients would be extra work), SSL losses and
    # ghost clipping (its own double backward) keep the usual backward.
    per_sample_only = (
        privacy is not None and privacy.grad_sample_mode == "hooks" and classification
        and all(p.requires_grad for p in trained.parameters())
        and (frozen is not None or not has_fixed_front_end(model))  # (a fixed front end passes no image gradient)
    )
    ema = _Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # train.amp: autocast of the forward pass and the loss (a GradScaler for float16), and channels-last 2D
    # convolutions on a GPU; neither under DP-SGD (medfed.common.hardware). Off, the step is the float32 one.
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(precision) else None
    channels_last = privacy is None and use_channels_last(device, spatial_dims)
    if channels_last:
        trained.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (nn.Module.to takes it)

    summed_loss = getattr(criterion, "reduction", "mean") == "sum"  # DP-SGD's (hooks): the batch's sum, not mean
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad] if proximal_mu > 0 else []
    max_steps = steps
    planned = max_steps or epochs * -(-len(data) // cfg.batch_size)  # (a plain pass: ceil(n / batch) steps)
    total_loss, total_seen, steps, epoch = 0.0, 0, 0, 0
    while (steps < max_steps) if max_steps else (epoch < epochs):
        batches = (private.epoch_batches() if private
                   else contextlib.nullcontext(_batches(data, cfg, generator)))
        epoch += 1
        with batches as epoch_batches:
            for images, labels in epoch_batches:
                if max_steps and steps >= max_steps:
                    break
                if step_lr is not None:
                    set_lr(optimizer, step_lr((steps + 1) / planned))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if augment is not None:
                    images = augment(images)
                optimizer.zero_grad(set_to_none=True)
                if per_sample_only:
                    images.requires_grad_(True)
                if channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                with (torch.autocast(device_type=device.type, dtype=precision) if precision is not None
                      else contextlib.nullcontext()):
                    loss = criterion(forward(images), labels)
                objective = loss + proximal_term(model, anchor, proximal_mu) if proximal_mu > 0 else loss
                if scaler is not None:  # float16: backward of the scaled loss; a step with an overflow is skipped
                    scaler.scale(objective).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    if per_sample_only:
                        objective.backward(inputs=[images])
                    else:  # (ghost clipping's loss wrapper takes no inputs=)
                        objective.backward()
                    optimizer.step()
                if ema is not None:
                    ema.update()
                total_loss += float(loss.detach()) * (1 if summed_loss else len(labels))
                total_seen += len(labels)
                steps += 1
    sample_rate = None
    if private:
        private.model.remove_hooks()
        steps, sample_rate = private.steps_and_rate()
    if ema is not None:
        ema.apply()
    if channels_last:  # the weights leave in the usual layout
        trained.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    seconds = time.perf_counter() - started
    return LocalTrainResult(
        loss=total_loss / max(1, total_seen),
        num_examples=n_train,
        steps=steps,
        seconds=seconds,
        sample_rate=sample_rate,
    )


class _Ema:
    """Exponential moving average of a model's trainable weights over optimizer steps (post-processing: under DP
    it reads only the noised weights, so it costs no privacy)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            param.copy_(shadow)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - anchor||^2 over the trainable parameters (its gradient is mu * (w - anchor))."""
    params = [p for p in model.parameters() if p.requires_grad]
    squares = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return (mu / 2) * cast(torch.Tensor, squares)  # a sum of tensors (mypy types sum()'s start 0 in)


def _summed_over_batch(criterion: nn.Module) -> nn.Module:
    """A copy of ``criterion`` that sums its per-image terms over the batch (``reduction="sum"``).

    Raises:
        TypeError: a criterion without a ``reduction`` of ``"mean"`` or ``"sum"``.
    """
    if getattr(criterion, "reduction", None) not in ("mean", "sum"):
        raise TypeError(f"DP-SGD needs a criterion with reduction 'mean' or 'sum', got {type(criterion).__name__}.")
    summed = copy.copy(criterion)
    setattr(summed, "reduction", "sum")  # noqa: B010 (an attribute of every torch loss, not of nn.Module)
    return summed


class _BatchedTensors(torch.utils.data.Dataset):
    """Images and labels as tensors; the DataLoader fetches a batch's indices at once (``__getitems__``), from
    memory or from the site's disk cache."""

    def __init__(self, data: ArrayDataset) -> None:
        self.images, self.labels = data.images, torch.from_numpy(data.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[index])), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.images[index])), self.labels[torch.from_numpy(index)]


def _as_batched(batch: Any) -> Any:
    """The collate function of :class:`_BatchedTensors`: its batches come stacked already."""
    return batch


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    data: ArrayDataset,
    cfg: TrainConfig,
    seed: int,
    privacy: DPTraining,
) -> _PrivateTraining:
    """Opacus' wrapped model, DP optimizer, loss, a per-epoch batch source and the engine (its accountant)."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    import medfed.client.grad_samplers  # noqa: F401  (registers medfed's faster convolution per-sample gradients)

    generator = None if privacy.secure_mode else torch.Generator().manual_seed(seed)
    # whole batches by one indexing op, not image by image and stacked (train.augment runs on the loaded batch)
    loader = torch.utils.data.DataLoader(_BatchedTensors(data), batch_size=cfg.batch_size, generator=generator,
                                         collate_fn=_as_batched, **_loading(cfg))
    engine = PrivacyEngine(accountant="rdp", secure_mode=privacy.secure_mode)
    noise = None if privacy.secure_mode else torch.Generator().manual_seed(seed + 1)
    ghost = privacy.grad_sample_mode == "ghost"
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
        grad_sample_mode=privacy.grad_sample_mode,
        # hooks: the loss is summed over the batch, so each image's gradient is its own loss's (Opacus then needs
        # no rescaling of every layer's output gradient); ghost clipping reduces per-image losses itself
        loss_reduction="mean" if ghost else "sum",
    )
    if ghost:
        wrapped, dp_optimizer, dp_criterion, dp_loader = made
    else:
        (wrapped, dp_optimizer, dp_loader), dp_criterion = made, _summed_over_batch(criterion)
        # the update stays the mean: the noisy sum of clipped gradients over the expected batch size, as with
        # loss_reduction="mean" (which would only differ by rescaling every per-sample gradient by the batch size)
        dp_optimizer.loss_reduction = "mean"

    def epoch() -> BatchMemoryManager:
        return BatchMemoryManager(
            data_loader=dp_loader, max_physical_batch_size=privacy.max_physical_batch_size, optimizer=dp_optimizer
        )

    return _PrivateTraining(wrapped, dp_optimizer, dp_criterion, epoch, engine)
