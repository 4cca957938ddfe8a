"""Typed configuration of medfed: schemas, validation, composition and the Flower run-config bridge.

The schema lives here as dataclasses registered in Hydra's ConfigStore; the values live in the YAML groups of
``common/conf``. ``compose_config(overrides)`` turns ``key=value`` strings into a validated :class:`Config`. Every
``__post_init__`` validates (never mutates) and raises :class:`~common.errors.ConfigError` naming the key, the bad
value and what is allowed.

Both Flower apps receive the same overrides through the run config (``RUN_CONFIG_OVERRIDES``) and compose the same
typed config from the same tree, so the ServerApp and every ClientApp agree on the recipe.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError

__all__ = [
    "CONF_DIR",
    "RUN_CONFIG_OVERRIDES",
    "AugmentConfig",
    "CentralDPConfig",
    "Config",
    "DPConfig",
    "DatasetConfig",
    "EvaluateConfig",
    "FederationConfig",
    "FolderConfig",
    "MedMNISTConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SSLConfig",
    "TrackingConfig",
    "StrategyConfig",
    "TrimmedMeanConfig",
    "KrumConfig",
    "PersonalizeConfig",
    "ProxConfig",
    "ServerMomentumConfig",
    "ServerOptimizerConfig",
    "AdaptiveMomentsConfig",
    "SyntheticConfig",
    "TrainConfig",
    "compose_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "overrides_from_run_config",
    "register_schemas",
    "run_config_from_overrides",
]

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent / "conf"
RUN_CONFIG_OVERRIDES = "medfed-overrides"

PARTITIONS = ("iid", "dirichlet", "quantity")
ATTACKS = ("none", "scale", "noise")  # simulated poisoning (federation.attack)
FINETUNE_MODES = ("full", "partial", "linear_probe")  # which layers train (model.finetune)
MODEL_NORMS = ("group", "batch")  # the normalisation after each convolution (model.norm)
LOCAL_LAYERS = ("none", "norm", "head", "norm_head")  # layers a hospital keeps to itself (personalize.local_layers)
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTINGS = ("none", "balanced")


def _choice(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of: {', '.join(str(a) for a in allowed)} "
            f"(e.g. `{key}={allowed[0]}` on the command line)."
        )


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is out of range; it must be a finite number {bound}.")


def _fraction(key: str, value: float, *, low_open: bool = True, high_open: bool = False) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {lo}, {hi}.")


@dataclass
class DatasetConfig:
    """Base of every dataset option; ``source`` picks the loader (set by the group's YAML)."""

    source: str = "synthetic"
    # label scarcity (task=classify): each hospital keeps the labels of this stratified fraction of its training
    # images (at least one per class); task=ssl uses every image, labelled or not
    label_fraction: float = 1.0
    name: str = "synthetic"


@dataclass
class MedMNISTConfig(DatasetConfig):
    """An official MedMNIST v2/v3 npz file, ``ROOT/NAME.npz`` (28 px) or ``ROOT/NAME_SIZE.npz``."""

    source: str = "medmnist"
    name: str = "pneumoniamnist"
    root: str = "~/.medmnist"
    size: int = 28
    download: bool = False

    def __post_init__(self) -> None:
        _choice("dataset.size", self.size, (28, 64, 128, 224))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(
                f"dataset.name={self.name!r} is not a MedMNIST flag; use e.g. pneumoniamnist, breastmnist, "
                "organamnist or adrenalmnist3d."
            )


@dataclass
class SyntheticConfig(DatasetConfig):
    """An offline synthetic imaging task whose hospitals differ like scanners (intensity, contrast, noise)."""

    source: str = "synthetic"
    name: str = "synthetic"
    n_train: int = 1200
    n_test: int = 400
    n_classes: int = 2
    channels: int = 1
    spatial_dims: int = 2
    image_size: int = 28
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("dataset.n_train", self.n_train)
        _positive("dataset.n_test", self.n_test)
        if self.n_classes < 2:
            raise ConfigError(f"dataset.n_classes={self.n_classes!r} is out of range; it must be >= 2.")
        _choice("dataset.channels", self.channels, (1, 3))
        _choice("dataset.spatial_dims", self.spatial_dims, (2, 3))
        if self.image_size < 8:
            raise ConfigError(f"dataset.image_size={self.image_size!r} is out of range; it must be >= 8.")


@dataclass
class FolderConfig(DatasetConfig):
    """Each simulated hospital's own image folder (DICOM files/series, NIfTI, PNG/JPEG), as a deployed hospital
    would have it; labels from a manifest per hospital or class subfolders (see ``medfed hospital check``)."""

    source: str = "folder"
    name: str = "folder"
    roots: list[str] = field(default_factory=list)  # one folder per simulated hospital
    labels: list[str] = field(default_factory=list)  # a manifest per hospital ('' or none: class subfolders)
    test_root: str = ""  # the global test set's folder ('': the hospitals' images marked split=test)
    test_labels: str = ""
    classes: list[str] = field(default_factory=list)  # label names in class-index order
    image_size: int = 28
    channels: int = 1
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(
                f"dataset.classes={list(self.classes)!r} must name at least 2 labels, in class-index order, e.g. "
                "dataset.classes=[benign,malignant]."
            )
        if not self.roots:
            raise ConfigError("dataset.roots is empty; give one image folder per hospital, e.g. dataset.roots=[a,b].")
        if self.labels and len(self.labels) != len(self.roots):
            raise ConfigError(
                f"dataset.labels has {len(self.labels)} entries for {len(self.roots)} dataset.roots; give one manifest "
                "per hospital ('' for class subfolders) or none."
            )
        _choice("dataset.channels", self.channels, (1, 3))
        _choice("dataset.spatial_dims", self.spatial_dims, (2, 3))
        if self.image_size < 8:
            raise ConfigError(f"dataset.image_size={self.image_size!r} is out of range; it must be >= 8.")


@dataclass
class ModelConfig:
    """Which registered network to build; channels, classes and dimensionality come from the dataset."""

    name: str = "smallcnn"
    width: int = 32
    dropout: float = 0.0
    # transfer learning: a local weights file the coordinator starts the run from ('' = random initialisation), and
    # which layers train: full (all), partial (the encoder's last stage and the head), linear_probe (the head only)
    pretrained: str = ""
    finetune: str = "full"
    # normalisation after each convolution: group (GroupNorm; works with DP-SGD) | batch (BatchNorm; runs without DP)
    norm: str = "group"

    def __post_init__(self) -> None:
        _positive("model.width", self.width)
        _choice("model.norm", self.norm, MODEL_NORMS)
        _fraction("model.dropout", self.dropout, low_open=False, high_open=True)
        _choice("model.finetune", self.finetune, FINETUNE_MODES)
        if not isinstance(self.pretrained, str):
            raise ConfigError(f"model.pretrained={self.pretrained!r} must be a file path (or '' for none).")


@dataclass
class StrategyConfig:
    """Which aggregation strategy the coordinator runs, and how many hospitals take part each round."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout_s: float = 3600.0  # how long each phase of a round waits for replies before going on without
    max_update_norm_ratio: float = 10.0  # reject an update farther from the global model than this x the median; 0 off

    def __post_init__(self) -> None:
        _fraction("strategy.fraction_train", self.fraction_train)
        _fraction("strategy.fraction_evaluate", self.fraction_evaluate, low_open=False)
        for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must be >= 1.")
        if not self.max_update_norm_ratio >= 0:
            raise ConfigError(
                f"strategy.max_update_norm_ratio={self.max_update_norm_ratio!r} is out of range; it must be >= 0 "
                "(0 turns the check off; 10 rejects an update 10 x farther from the global model than the median)."
            )
        if not self.round_timeout_s > 0:
            raise ConfigError(
                f"strategy.round_timeout_s={self.round_timeout_s!r} is out of range; it must be > 0 seconds (the "
                "time each phase of a round waits for the hospitals' replies)."
            )


@dataclass
class ProxConfig(StrategyConfig):
    """Flower's FedProx: FedAvg whose hospitals add (mu / 2) * ||w - w_global||^2 to their local loss."""

    name: str = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu >= 0.0:
            raise ConfigError(
                f"strategy.mu={self.mu!r} is out of range; it must be >= 0 (the proximal weight; 0 is FedAvg, "
                "0.001-1 are usual)."
            )


@dataclass
class TrimmedMeanConfig(StrategyConfig):
    """Flower's FedTrimmedAvg: per coordinate, the mean after cutting ``beta`` of the updates at each end."""

    name: str = "fedtrimmedavg"
    beta: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(
                f"strategy.beta={self.beta!r} is out of range; it must lie in [0, 0.5) (the share of updates cut at "
                "each end of every coordinate; 0.2 of 5 hospitals cuts one at each end)."
            )


@dataclass
class KrumConfig(StrategyConfig):
    """Flower's Krum / MultiKrum: keep the update(s) closest to their neighbours, tolerating
    ``num_malicious_nodes`` attackers; MultiKrum averages the ``num_nodes_to_select`` best."""

    name: str = "krum"
    num_malicious_nodes: int = 1
    num_nodes_to_select: int = 1  # multikrum only

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, minimum in (("num_malicious_nodes", 0), ("num_nodes_to_select", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must be an integer >= {minimum}.")


@dataclass
class ServerMomentumConfig(StrategyConfig):
    """Flower's FedAvgM: the averaged update is a pseudo-gradient for server SGD with momentum."""

    name: str = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.server_learning_rate > 0.0:
            raise ConfigError(
                f"strategy.server_learning_rate={self.server_learning_rate!r} is out of range; it must be > 0 "
                "(1.0 applies the averaged update as it is)."
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"strategy.server_momentum={self.server_momentum!r} is out of range; it must lie in [0, 1) "
                "(0 is FedAvg with a server learning rate; 0.9 is usual)."
            )


@dataclass
class ServerOptimizerConfig(StrategyConfig):
    """Flower's adaptive server optimizers (Reddi et al. 2021): the averaged update is a pseudo-gradient for a
    server-side step of size ``eta``; ``tau`` bounds how adaptive it is. FedAdagrad takes these two."""

    name: str = "fedadagrad"
    eta: float = 0.01
    tau: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta > 0.0:
            raise ConfigError(
                f"strategy.eta={self.eta!r} is out of range; it must be > 0 (the server learning rate; "
                "0.001-0.1 are usual)."
            )
        if not self.tau > 0.0:
            raise ConfigError(
                f"strategy.tau={self.tau!r} is out of range; it must be > 0 (the adaptivity: larger is closer to "
                "server SGD; 0.001 is usual)."
            )


@dataclass
class AdaptiveMomentsConfig(ServerOptimizerConfig):
    """FedAdam and FedYogi: a server optimizer with first (``beta_1``) and second (``beta_2``) moment decay."""

    name: str = "fedadam"
    beta_1: float = 0.9
    beta_2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta_1", "beta_2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must lie in [0, 1).")


@dataclass
class FederationConfig:
    """How the simulated federation is made: how many hospitals and how the data is split between them."""

    hospitals: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    val_fraction: float = 0.2
    min_samples: int = 10
    threads: int = 0  # torch threads per hospital process; 0 = all cores / parallel

    parallel: int = 1  # hospitals trained at once in simulation
    # Each simulated hospital's own privacy cap (in deployment a hospital sets it in its node config):
    # cumulative epsilon over every run on its data, the largest delta it accepts, the least noise it accepts.
    site_max_epsilon: float = math.inf
    site_max_epsilon_each: list[float] = field(default_factory=list)  # per hospital, overrides site_max_epsilon
    site_max_delta: float = 1e-5
    site_min_noise: float = 0.0
    # A robustness experiment (simulation only; a deployed hospital never reads it): the first `attackers`
    # simulated hospitals send a poisoned update, scaled (`scale`: global + attack_scale x their update) or
    # replaced by Gaussian noise (`noise`: global + N(0, attack_scale^2) per weight).
    attack: str = "none"
    attackers: int = 1
    attack_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError(f"federation.hospitals={self.hospitals!r} is out of range; it must be >= 1.")
        _choice("federation.partition", self.partition, PARTITIONS)
        _positive("federation.alpha", self.alpha)
        _fraction("federation.val_fraction", self.val_fraction, high_open=True)
        if self.min_samples < 1:
            raise ConfigError(f"federation.min_samples={self.min_samples!r} is out of range; it must be >= 1.")
        if self.threads < 0:
            raise ConfigError(f"federation.threads={self.threads!r} is out of range; use 0 (auto) or more.")
        if self.parallel < 1:
            raise ConfigError(f"federation.parallel={self.parallel!r} is out of range; it must be >= 1.")
        for key, cap in [("federation.site_max_epsilon", self.site_max_epsilon)] + [
            (f"federation.site_max_epsilon_each[{i}]", c) for i, c in enumerate(self.site_max_epsilon_each)
        ]:
            if not cap > 0:
                raise ConfigError(f"{key}={cap!r} is out of range; it must be > 0 (inf: no cap).")
        if self.site_max_epsilon_each and len(self.site_max_epsilon_each) != self.hospitals:
            raise ConfigError(
                f"federation.site_max_epsilon_each has {len(self.site_max_epsilon_each)} values but "
                f"federation.hospitals={self.hospitals}; give one cap per hospital or leave it empty."
            )
        _fraction("federation.site_max_delta", self.site_max_delta, high_open=True)
        _positive("federation.site_min_noise", self.site_min_noise, allow_zero=True)
        _choice("federation.attack", self.attack, ATTACKS)
        if self.attack != "none" and not 1 <= self.attackers < self.hospitals:
            raise ConfigError(
                f"federation.attackers={self.attackers!r} is out of range; with federation.attack={self.attack} it "
                f"must lie in [1, federation.hospitals={self.hospitals}) (some hospitals must stay honest)."
            )
        _positive("federation.attack_scale", self.attack_scale)


@dataclass
class PersonalizeConfig:
    """Personalisation: layers each hospital keeps to itself (FedBN-style norm layers, FedPer-style head) and local
    fine-tuning of the final model; hospitals then report global and personalised metrics."""

    local_layers: str = "none"
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        _choice("personalize.local_layers", self.local_layers, LOCAL_LAYERS)
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ConfigError(
                f"personalize.finetune_epochs={self.finetune_epochs!r} is out of range; it must be an integer >= 0 "
                "(0: no local fine-tuning)."
            )

    @property
    def enabled(self) -> bool:
        return self.local_layers != "none" or self.finetune_epochs > 0


def _count(key: str, value: object, *, minimum: int, meaning: str) -> None:
    """An int that is 0 (off) or at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < minimum):
        raise ConfigError(f"{key}={value!r} is out of range; it must be 0 (off) or an integer >= {minimum} ({meaning}).")


@dataclass
class EvaluateConfig:
    """What happens after the last round: federated temperature scaling on the hospitals' validation splits, the
    coordinator's uncertainty analysis on the test set (MC dropout, snapshot ensemble, referral), and Grad-CAM maps
    each hospital computes and keeps."""

    calibrate: bool = True
    mc_samples: int = 0
    snapshots: int = 0
    gradcam_samples: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.calibrate, bool):
            raise ConfigError(f"evaluate.calibrate={self.calibrate!r} is not allowed; it must be true or false.")
        _count("evaluate.mc_samples", self.mc_samples, minimum=2, meaning="stochastic passes with dropout on")
        _count("evaluate.snapshots", self.snapshots, minimum=2, meaning="global models of the last rounds")
        _count("evaluate.gradcam_samples", self.gradcam_samples, minimum=1, meaning="maps per hospital")


SSL_METHODS = ("simclr", "mim")
TASKS = ("classify", "ssl")


@dataclass
class SSLConfig:
    """Self-supervised pretraining (``task=ssl``): SimCLR-style contrastive learning or masked image modelling."""

    method: str = "simclr"
    temperature: float = 0.2  # SimCLR's NT-Xent temperature (0.2 beat 0.5 on PneumoniaMNIST, docs/benchmarks.md)
    projection_dim: int = 64  # SimCLR's projector output
    mask_ratio: float = 0.5  # MIM: the fraction of patches hidden
    patch_size: int = 4  # MIM: the side of a hidden square (cube), pixels

    def __post_init__(self) -> None:
        _choice("ssl.method", self.method, SSL_METHODS)
        _positive("ssl.temperature", self.temperature)
        _fraction("ssl.mask_ratio", self.mask_ratio, high_open=True)
        for key in ("projection_dim", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ssl.{key}={value!r} is out of range; it must be an integer >= 1.")


@dataclass
class TrackingConfig:
    """Optional extra outputs of every run: TensorBoard event files of the per-round metrics."""

    tensorboard: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tracking.tensorboard={self.tensorboard!r} is not allowed; it must be true or false.")

    def require_runtime(self) -> None:
        """Fail before the first round when TensorBoard logging is asked for and its package is missing."""
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "tracking.tensorboard=true needs the tensorboard package: pip install 'medfed[tensorboard]' "
                    "(or set tracking.tensorboard=false)."
                ) from None


@dataclass
class AugmentConfig:
    """MONAI augmentation applied to training images (2D and 3D): flip, rotate, scale, intensity."""

    enabled: bool = False
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.1
    prob: float = 0.5

    def __post_init__(self) -> None:
        _fraction("train.augment.flip_prob", self.flip_prob, low_open=False)
        _fraction("train.augment.prob", self.prob, low_open=False)
        _positive("train.augment.rotate_deg", self.rotate_deg, allow_zero=True)
        _fraction("train.augment.scale", self.scale, low_open=False, high_open=True)
        _fraction("train.augment.intensity", self.intensity, low_open=False, high_open=True)


@dataclass
class TrainConfig:
    """The learning recipe: rounds, local epochs, optimizer and loss; identical for federated runs and baselines."""

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "constant"  # cosine: decay from lr to lr * lr_min_factor over the rounds
    lr_min_factor: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    class_weighting: str = "none"
    seed: int = 0
    encoder_lr_scale: float = 1.0  # discriminative learning rates: the encoder trains at lr x this, the head at lr
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def round_lr(self, server_round: int) -> float:
        """The learning rate of a round (1-based): constant, or cosine-decayed to ``lr * lr_min_factor``."""
        if self.lr_schedule == "constant" or self.rounds <= 1:
            return self.lr
        progress = min(max(server_round - 1, 0), self.rounds - 1) / (self.rounds - 1)
        low = self.lr * self.lr_min_factor
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))

    def __post_init__(self) -> None:
        for key in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"train.{key}={value!r} is out of range; it must be >= 1.")
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _fraction("train.lr_min_factor", self.lr_min_factor, low_open=False)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _fraction("train.momentum", self.momentum, low_open=False, high_open=True)
        _positive("train.encoder_lr_scale", self.encoder_lr_scale)


PRIVACY_MECHANISMS = ("none", "dp", "central_dp")
ACCOUNTANTS = ("rdp",)  # Opacus' RDP analysis (its PRV accountant needs huge memory at small noise)
GRAD_SAMPLE_MODES = ("hooks", "ghost")


@dataclass
class PrivacyConfig:
    """Privacy mechanism the coordinator requests (``none``: images stay at the sites, nothing more)."""

    name: str = "none"
    # Flower's SecAgg+ (legacy workflow): the coordinator only ever sees the sum of the hospitals' updates
    secure_aggregation: bool = False
    secagg_shares: int = 0  # secret shares per hospital's key; 0 = every other hospital
    secagg_threshold: int = 0  # shares needed to reconstruct; 0 = two thirds of the shares (at least 2)
    secagg_max_weight: float = 2000.0  # >= the largest hospital's training images (larger costs precision)

    def __post_init__(self) -> None:
        _choice("privacy.name", self.name, PRIVACY_MECHANISMS)
        for key in ("secagg_shares", "secagg_threshold"):
            if getattr(self, key) < 0:
                raise ConfigError(f"privacy.{key}={getattr(self, key)!r} is out of range; use 0 (auto) or more.")
        _positive("privacy.secagg_max_weight", self.secagg_max_weight)


@dataclass
class DPConfig(PrivacyConfig):
    """Sample-level differential privacy at every hospital: Opacus DP-SGD (Poisson sampling, clipping, noise).

    ``target_epsilon`` is what one run may spend at each hospital; the noise multiplier is derived from it over the
    planned rounds and the hospital's data size. A hospital's own cap (``federation.site_*`` in simulation, its
    node config in deployment) can only make this stricter.
    """

    name: str = "dp"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    max_noise_multiplier: float = 10.0  # a site refuses when fitting its cap would need more noise (useless updates)
    accountant: str = "rdp"
    max_physical_batch_size: int = 64  # Opacus BatchMemoryManager: the logical batch is train.batch_size
    grad_sample_mode: str = "hooks"  # hooks | ghost (ghost clipping: no per-sample gradients in memory)
    secure_mode: bool = False  # cryptographically secure noise (torchcsprng); deployed sites: site secure_rng

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("privacy.target_epsilon", self.target_epsilon)
        _fraction("privacy.delta", self.delta, high_open=True)
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        _positive("privacy.max_noise_multiplier", self.max_noise_multiplier)
        _choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        if self.max_physical_batch_size < 1:
            raise ConfigError(
                f"privacy.max_physical_batch_size={self.max_physical_batch_size!r} is out of range; it must be >= 1."
            )
        _choice("privacy.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)

    def require_runtime(self) -> None:
        """Fail before training when this machine cannot do what the config asks (secure RNG)."""
        import importlib.util

        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError(
                "privacy.secure_mode=true needs the torchcsprng package for cryptographically secure noise, and it "
                "is not installed (it has no wheel for this torch: build it from source, docs/operations.md 'A "
                "secure RNG for DP'). Install it, or set "
                "privacy.secure_mode=false for experiments (Opacus then warns that the RNG is not secure)."
            )



@dataclass
class CentralDPConfig(PrivacyConfig):
    """Client-level DP: each hospital's update is clipped at the hospital (Flower's ``fixedclipping_mod``) and the
    coordinator adds Gaussian noise to the sum (Flower's ``DifferentialPrivacyClientSideFixedClipping``), with
    Flower's RDP accountant reporting the run-level epsilon. Protects whole hospitals, trusts the coordinator with
    the noise."""

    name: str = "central_dp"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # L2 bound on each hospital's model update
    delta: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("privacy.noise_multiplier", self.noise_multiplier)
        _positive("privacy.clipping_norm", self.clipping_norm)
        if self.secure_aggregation:
            raise ConfigError(
                "privacy=central_dp cannot be combined with privacy.secure_aggregation=true (Flower's central-DP "
                "wrapper and SecAgg+ live in different workflows); use privacy=dp with secure aggregation instead."
            )
        _fraction("privacy.delta", self.delta, high_open=True)

@dataclass
class Config:
    """The whole typed configuration of one medfed run."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: str = "classify"  # classify: supervised; ssl: self-supervised pretraining of the encoder (no labels)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _fraction("dataset.label_fraction", self.dataset.label_fraction)
        if self.task == "ssl":
            _check_ssl(self)
        if self.evaluate.mc_samples > 0 and self.model.dropout <= 0.0:
            raise ConfigError(
                f"evaluate.mc_samples={self.evaluate.mc_samples} needs a model trained with dropout, but "
                "model.dropout=0; set model.dropout=0.2 (for example) or evaluate.mc_samples=0."
            )
        if self.personalize.enabled and (self.privacy.name != "none" or self.privacy.secure_aggregation):
            raise ConfigError(
                "personalize.* cannot run with privacy=dp, privacy=central_dp or secure aggregation yet: local layers "
                "and fine-tuning steps are training on the hospital's data that the privacy accounting does not "
                "cover. Leave personalize.local_layers=none and personalize.finetune_epochs=0 for private runs."
            )
        if self.model.norm == "batch" and self.privacy.name != "none":
            raise ConfigError(
                f"model.norm=batch cannot run with privacy={self.privacy.name}: BatchNorm normalises each image by "
                "its batch's statistics, so one image's influence is not bounded (DP-SGD), and its running "
                "statistics would be noised like weights (central DP). Use model.norm=group with privacy, or "
                "privacy=none."
            )
        if self.model.norm == "batch" and self.privacy.secure_aggregation:
            raise ConfigError(
                "model.norm=batch cannot run with privacy.secure_aggregation=true: SecAgg+ quantises every value into "
                "a fixed range ([-8, 8]), and BatchNorm's running variances can lie outside it. Use model.norm=group "
                "with secure aggregation."
            )
        if self.privacy.secure_aggregation and self.strategy.name != "fedavg":
            raise ConfigError(
                f"strategy={self.strategy.name} cannot run with privacy.secure_aggregation=true: SecAgg+ gives the "
                "coordinator only the sum of the updates, and this strategy needs each one. Use strategy=fedavg, or "
                "turn secure aggregation off."
            )
        if isinstance(self.strategy, ProxConfig) and self.strategy.mu > 0 and self.privacy.name == "dp":
            raise ConfigError(
                "strategy=fedprox cannot run with privacy=dp yet: Opacus builds each update from per-sample "
                "gradients, which leave the proximal term out. Use strategy=fedavg (or another aggregator) with "
                "privacy=dp, or strategy.mu=0."
            )
        if self.privacy.name == "dp" and self.train.class_weighting != "none":
            raise ConfigError(
                f"train.class_weighting={self.train.class_weighting} cannot run with privacy=dp: the weights are "
                "computed from the hospital's training labels, so every image's loss would depend on the others' "
                "labels, which DP-SGD's epsilon does not account for. Use train.class_weighting=none with "
                "privacy=dp."
            )
        if isinstance(self.dataset, FolderConfig) and len(self.dataset.roots) != self.federation.hospitals:
            raise ConfigError(
                f"dataset.roots has {len(self.dataset.roots)} folders but federation.hospitals="
                f"{self.federation.hospitals}; each simulated hospital needs its own folder."
            )
        if self.strategy.min_train_nodes > self.federation.hospitals:
            raise ConfigError(
                f"strategy.min_train_nodes={self.strategy.min_train_nodes} exceeds federation.hospitals="
                f"{self.federation.hospitals}; lower strategy.min_train_nodes or add hospitals."
            )


def _check_ssl(self: Config) -> None:
    """What self-supervised pretraining cannot be combined with, said before anything starts."""
    if self.ssl.method == "simclr" and self.privacy.name == "dp":
        raise ConfigError(
            "task=ssl ssl.method=simclr cannot run with privacy=dp: the contrastive loss couples every image of a "
            "batch, so per-sample clipping does not bound one image's influence and the epsilon would not hold. Use "
            "ssl.method=mim (masked image modelling: one loss per image) with privacy=dp."
        )
    if self.privacy.name == "dp" and getattr(self.privacy, "grad_sample_mode", "hooks") != "hooks":
        raise ConfigError("task=ssl with privacy=dp needs privacy.grad_sample_mode=hooks.")
    if self.personalize.enabled:
        raise ConfigError("task=ssl trains one shared encoder: leave personalize.* off.")
    if self.evaluate.mc_samples or self.evaluate.snapshots or self.evaluate.gradcam_samples:
        raise ConfigError("evaluate.mc_samples/snapshots/gradcam_samples are for classifiers; task=ssl has no "
                          "predictions. Leave them 0 (the SSL run reports its representation quality instead).")
    if self.model.pretrained or self.model.finetune != "full":
        raise ConfigError("task=ssl pretrains an encoder from scratch; model.pretrained and model.finetune apply to "
                          "the supervised run that follows it.")


_SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"medmnist": MedMNISTConfig, "synthetic": SyntheticConfig, "folder": FolderConfig},
    "model": {"base": ModelConfig},
    "strategy": {"base": StrategyConfig, "prox": ProxConfig, "trimmed_mean": TrimmedMeanConfig, "krum": KrumConfig,
                 "server_momentum": ServerMomentumConfig,
                 "server_optimizer": ServerOptimizerConfig, "adaptive_moments": AdaptiveMomentsConfig},
    "federation": {"base": FederationConfig},
    "train": {"base": TrainConfig},
    "privacy": {"none": PrivacyConfig, "dp": DPConfig, "central_dp": CentralDPConfig},
}


def register_schemas() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent; called by :func:`compose_config`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="medfed_schema", node=Config)
    for group, options in _SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"{option}_schema", node=schema)


def _group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _explain_hydra_error(overrides: Sequence[str], exc: Exception) -> ConfigError:
    text = str(exc).strip()
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        if "." not in group and group in _SCHEMAS and value and f"{group}/{value}" in text:
            return ConfigError(
                f"{group}={value!r} is not a known {group} option; choose one of: "
                f"{', '.join(_group_choices(group))}."
            )
    if "Could not override" in text or "not in struct" in text:
        key = text.split("'")[1] if text.count("'") >= 2 else text
        return ConfigError(
            f"{key!r} is not a key of the medfed config (a typo, or a key of another group option). "
            "`medfed config show` lists every key with its current value."
        )
    cause = exc.__cause__
    if cause is not None and "could not be converted" in str(cause):
        detail = str(cause).splitlines()[0]
        full_key = next((ln.split(":", 1)[1].strip() for ln in str(cause).splitlines() if "full_key:" in ln), "")
        return ConfigError(
            f"{full_key}: {detail}; give a value of that type (`medfed config show` shows the current one)."
        )
    detail = f" ({str(cause).splitlines()[0]})" if cause is not None else ""
    return ConfigError(f"Invalid configuration: {text.splitlines()[0]}{detail}")


_COMPOSED: dict[tuple[str, ...], Config] = {}


def compose_config(overrides: Iterable[str] = ()) -> Config:
    """Compose ``common/conf/config.yaml`` with ``key=value`` overrides into a validated :class:`Config`.

    Hydra costs 0.1-0.3 s per composition, and in simulation one process hosts the ServerApp or every virtual
    hospital, so results are kept per process (keyed by the overrides); each call returns its own copy.

    Raises:
        ConfigError: naming the key, the bad value and the allowed values, before anything starts.
    """
    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(list(key))
    return copy.deepcopy(_COMPOSED[key])


def _compose(overrides: list[str]) -> Config:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for override in overrides:
        if "=" not in override:
            raise ConfigError(
                f"Override {override!r} is not of the form key=value (e.g. `train.rounds=20` or `dataset=medmnist`)."
            )
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="medfed"):
            cfg = compose(config_name="config", overrides=overrides)
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as exc:  # __post_init__ raised through OmegaConf, or a type conversion failed
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise _explain_hydra_error(overrides, exc) from None
    except (HydraException, OmegaConfBaseException) as exc:
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, ConfigError):
            raise inner from None
        raise _explain_hydra_error(overrides, exc) from None
    if not isinstance(obj, Config):  # pragma: no cover - guarded by the schema in config.yaml
        raise ConfigError("common/conf/config.yaml does not use the medfed schema.")
    return obj


def config_to_yaml(cfg: Config) -> str:
    """Render a composed config as YAML (what the run directory keeps as ``config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-dict form of a composed config (JSON-serialisable)."""
    return asdict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`config_to_dict` output, validating every section again.

    Cheap (no Hydra): used to keep a node's composed config in Flower's ``context.state`` between messages.
    """
    train = dict(data["train"])
    train["augment"] = AugmentConfig(**train["augment"])
    return Config(
        dataset=_option_from_dict("dataset", "source", "dataset source", data["dataset"]),
        model=ModelConfig(**data["model"]),
        strategy=_strategy_from_dict(data["strategy"]),
        federation=FederationConfig(**data["federation"]),
        train=TrainConfig(**train),
        privacy=_option_from_dict("privacy", "name", "privacy mechanism", data["privacy"]),
        personalize=PersonalizeConfig(**data.get("personalize", {})),
        evaluate=EvaluateConfig(**data.get("evaluate", {})),
        tracking=TrackingConfig(**data.get("tracking", {})),
        task=data.get("task", "classify"),
        ssl=SSLConfig(**data.get("ssl", {})),
    )


def _strategy_from_dict(section: Mapping[str, Any]) -> StrategyConfig:
    """The strategy section with the schema of its options (the base one for strategies without options)."""
    extra = set(section) - {f.name for f in fields(StrategyConfig)}
    for schema in _SCHEMAS["strategy"].values():  # the option schemas registered for the Hydra group
        if extra and extra <= {f.name for f in fields(schema)}:
            return schema(**section)
    return StrategyConfig(**section)


def _option_from_dict(group: str, key: str, what: str, section: Mapping[str, Any]) -> Any:
    """A group with one schema per option: the schema its ``key`` field names, filled from ``section``."""
    schema = _SCHEMAS[group].get(section.get(key, ""))
    if schema is None:
        raise ConfigError(f"{group}.{key}={section.get(key)!r} is not a known {what}.")
    return schema(**section)


def run_config_from_overrides(overrides: Sequence[str], **extra: str | int | float | bool) -> dict[str, Any]:
    """Flower run config carrying the Hydra overrides (a JSON list) plus scalar extras."""
    return {RUN_CONFIG_OVERRIDES: json.dumps(list(overrides)), **extra}


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a run config carries; an absent key means the defaults."""
    raw = run_config.get(RUN_CONFIG_OVERRIDES, "[]")
    try:
        overrides = json.loads(str(raw) or "[]")
    except json.JSONDecodeError:
        raise ConfigError(
            f"Run config key {RUN_CONFIG_OVERRIDES!r} is not a JSON list of key=value strings; "
            "launch runs with `medfed simulate` or `medfed train`."
        ) from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"Run config key {RUN_CONFIG_OVERRIDES!r} must be a JSON list of strings.")
    return overrides
