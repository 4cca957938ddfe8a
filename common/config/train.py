"""Schema of the ``train`` group: the learning recipe and its augmentation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from medfed.common.config.checks import require_choice, require_device_spec, require_fraction, require_positive
from medfed.common.config.choices import (
    AMP_MODES,
    CLASS_WEIGHTINGS,
    LR_SCHEDULES,
    OPTIMIZERS,
    AmpMode,
    ClassWeighting,
    LRSchedule,
    Optimizer,
)
from medfed.common.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "TrainConfig",
]

logger = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Augmentation of training images (2D and 3D) at every step: flip, rotate, scale, intensity
    (:class:`~medfed.common.data.transforms.BatchAugmentation`)."""

    enabled: bool = False
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.1
    prob: float = 0.5

    def __post_init__(self) -> None:
        require_fraction("train.augment.flip_prob", self.flip_prob, low_open=False)
        require_fraction("train.augment.prob", self.prob, low_open=False)
        require_positive("train.augment.rotate_deg", self.rotate_deg, allow_zero=True)
        require_fraction("train.augment.scale", self.scale, low_open=False, high_open=True)
        require_fraction("train.augment.intensity", self.intensity, low_open=False, high_open=True)


@dataclass
class TrainConfig:
    """The learning recipe: rounds, local epochs, optimizer and loss; identical for federated runs and baselines."""

    rounds: int = 5
    # a hospital's work per round: local_steps optimizer steps, whatever its size (a small site cycles through its
    # images, a large one sees part of them), so sites of 4 and 4,000 images move the model alike; local_epochs > 0
    # counts it in passes over the site's training split instead (and then wins). Under privacy=dp and
    # distributed_dp it is always counted in epochs (the privacy plan counts Poisson-sampled epochs): 0 means 1 there
    local_steps: int = 50
    local_epochs: int = 0
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: Optimizer = Optimizer.adamw  # adamw | adam | sgd
    lr: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.constant  # cosine: decay from lr to lr * lr_min_factor over the rounds
    lr_min_factor: float = 0.1
    # linear warm-up of the learning rate over the first warmup_rounds rounds, step by step (each hospital's steps
    # in a round ramp from where the last round ended); 0 = none. Not under DP-SGD (its rounds keep one rate)
    warmup_rounds: float = 1.0
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    # none | balanced (inverse class frequency of the hospital's training split; not with privacy=dp)
    class_weighting: ClassWeighting = ClassWeighting.none
    seed: int = 0
    encoder_lr_scale: float = 1.0  # discriminative learning rates: the encoder trains at lr x this, the head at lr
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # augmentation multiplicity (De et al. 2022): each training image is seen as this many views (itself and
    # views-1 augmentations drawn once, with train.augment's settings), their gradients averaged into one per-image
    # gradient before DP clipping; models with a fixed front end only (model=scatternet, model.finetune=linear_probe)
    aug_views: int = 1
    # exponential moving average of the trained weights over a round's steps (free post-processing under DP);
    # 0 = off, else the decay per step in (0, 1)
    ema_decay: float = 0.0
    # early stopping on federated validation: the run stops once this many rounds in a row have not beaten the
    # best validation round (model selection's rule: weighted validation AUC, else loss) and reports that best
    # round; 0 = every planned round runs
    patience: int = 0
    # the hardware (medfed.common.hardware; a deployed hospital's site config overrides device, device_memory_gb,
    # loader_workers and pin_memory): auto (a GPU when torch sees one) | cpu | cuda | cuda:N
    device: str = "auto"
    # mixed precision: auto (bf16, or fp16 without bf16, on a GPU without DP; off on a CPU and under DP) | off |
    # bf16 | fp16 (not under DP: Opacus' per-sample clipping needs float32 gradients; fp16 not on a CPU)
    amp: AmpMode = AmpMode.auto
    # the memory the device offers training, in GiB, for the preflight before round 1; 0 = detect (a GPU's total
    # memory, the machine's available RAM)
    device_memory_gb: float = 0.0
    # data loading: worker processes of the training DataLoader (0: in the training process) and pinned host memory
    # for faster copies to a GPU
    loader_workers: int = 0
    pin_memory: bool = False

    def round_lr(self, server_round: int) -> float:
        """The learning rate of a round (1-based): constant, or cosine-decayed to ``lr * lr_min_factor``."""
        if self.lr_schedule == "constant" or self.rounds <= 1:
            return self.lr
        progress = min(max(server_round - 1, 0), self.rounds - 1) / (self.rounds - 1)
        low = self.lr * self.lr_min_factor
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))

    def step_lr(self, server_round: int, done: float) -> float:
        """The learning rate of a step ``done`` (in (0, 1]: the share of the round's steps done with this one) into
        a round: the round's rate (:meth:`round_lr`), times the linear warm-up while the run is within its first
        ``warmup_rounds`` rounds."""
        lr = self.round_lr(server_round)
        progress = server_round - 1 + done
        if self.warmup_rounds > 0 and progress < self.warmup_rounds:
            lr *= progress / self.warmup_rounds
        return lr

    def work(self) -> str:
        """A round's local work in words: ``"50 steps"`` or ``"2 epochs"``."""
        return f"{self.local_epochs} epochs" if self.local_epochs else f"{self.local_steps} steps"

    @property
    def dp_epochs(self) -> int:
        """A DP-SGD round's Poisson-sampled epochs: ``local_epochs``, 1 where the recipe counts steps (the composed
        config of a DP run already says 1; :mod:`medfed.common.config.private_recipes`)."""
        return self.local_epochs or 1

    def __post_init__(self) -> None:
        for key in ("rounds", "batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"train.{key}={value!r} is out of range; it must be >= 1.")
        for key in ("local_steps", "local_epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{key}={value!r} is out of range; it must be an integer >= 0.")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("train.local_steps=0 with train.local_epochs=0 leaves a round no work; set "
                              "train.local_steps=N (optimizer steps per round at every hospital, the default 50) or "
                              "train.local_epochs=N (passes over each hospital's training split).")
        if not isinstance(self.warmup_rounds, (int, float)) or isinstance(self.warmup_rounds, bool) \
                or not 0 <= self.warmup_rounds <= self.rounds:
            raise ConfigError(f"train.warmup_rounds={self.warmup_rounds!r} is out of range; it must be a number in "
                              f"[0, train.rounds={self.rounds}] (0: no warm-up).")
        require_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        require_choice("train.class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        require_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        require_fraction("train.lr_min_factor", self.lr_min_factor, low_open=False)
        require_positive("train.lr", self.lr)
        require_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        require_fraction("train.momentum", self.momentum, low_open=False, high_open=True)
        require_positive("train.encoder_lr_scale", self.encoder_lr_scale)
        if isinstance(self.aug_views, bool) or not isinstance(self.aug_views, int) or not 1 <= self.aug_views <= 64:
            raise ConfigError(f"train.aug_views={self.aug_views!r} is out of range; it must be an integer in [1, 64] "
                              "(1: no augmentation multiplicity).")
        require_fraction("train.ema_decay", self.ema_decay, low_open=False, high_open=True)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"train.patience={self.patience!r} is out of range; it must be an integer >= 0 (0: no "
                              "early stopping; N: stop after N rounds without a better validation round).")
        require_device_spec("train.device", self.device)
        require_choice("train.amp", self.amp, AMP_MODES)
        require_positive("train.device_memory_gb", self.device_memory_gb, allow_zero=True)
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ConfigError(f"train.loader_workers={self.loader_workers!r} is out of range; it must be an integer "
                              ">= 0 (0: load batches in the training process).")
