"""The choices of the config: one ``StrEnum`` per key that takes one of a few strings, and the tuple of its values.

A schema field is annotated with its enum (``optimizer: Optimizer = Optimizer.adamw``), so OmegaConf types the field
and a type checker knows the allowed values. Members are named as their values (``adamw = "adamw"``) because
OmegaConf turns the string of a YAML file or an override into a member by name. A member is a ``str``: it compares
equal to its value (``cfg.train.optimizer == "adamw"``), formats as it, and hashes as it; :func:`config_to_dict`
writes plain strings. A bad value is refused with the key, the value and the tuple of allowed values
(:func:`~medfed.common.config.checks.require_choice`, and :mod:`~medfed.common.config.hydra_errors` for what
OmegaConf refuses first).
"""

from __future__ import annotations

import logging
from enum import StrEnum

__all__ = [
    "ACCOUNTANTS",
    "AMP_MODES",
    "ATTACKS",
    "CLASS_WEIGHTINGS",
    "FINETUNE_MODES",
    "GRAD_SAMPLE_MODES",
    "LOCAL_LAYERS",
    "LR_SCHEDULES",
    "MODEL_NORMS",
    "OPTIMIZERS",
    "PARTITIONS",
    "PRIVACY_MECHANISMS",
    "SCATTER_HEADS",
    "SSL_METHODS",
    "TASKS",
    "Accountant",
    "AmpMode",
    "Attack",
    "ClassWeighting",
    "FinetuneMode",
    "GradSampleMode",
    "LRSchedule",
    "LocalLayers",
    "ModelNorm",
    "Optimizer",
    "Partition",
    "PrivacyMechanism",
    "SSLMethod",
    "ScatterHead",
    "Task",
]

logger = logging.getLogger(__name__)


class Partition(StrEnum):
    """How the simulated federation splits the data between hospitals (``federation.partition``)."""

    iid = "iid"
    dirichlet = "dirichlet"
    quantity = "quantity"


class Attack(StrEnum):
    """Simulated poisoning by the first hospitals (``federation.attack``)."""

    none = "none"
    scale = "scale"
    noise = "noise"


class FinetuneMode(StrEnum):
    """Which layers train (``model.finetune``)."""

    full = "full"
    partial = "partial"
    linear_probe = "linear_probe"


class ModelNorm(StrEnum):
    """The normalisation after each convolution (``model.norm``)."""

    group = "group"
    batch = "batch"


class ScatterHead(StrEnum):
    """The trainable head over the fixed scattering front end (``model.head`` of ``model=scatternet``)."""

    linear = "linear"
    cnn = "cnn"


class LocalLayers(StrEnum):
    """Layers a hospital keeps to itself (``personalize.local_layers``)."""

    none = "none"
    norm = "norm"
    head = "head"
    norm_head = "norm_head"


class Optimizer(StrEnum):
    """The local optimizer (``train.optimizer``)."""

    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class LRSchedule(StrEnum):
    """The learning rate over the rounds (``train.lr_schedule``)."""

    constant = "constant"
    cosine = "cosine"


class AmpMode(StrEnum):
    """Mixed precision of local training (``train.amp``; see :func:`medfed.common.hardware.amp_dtype`)."""

    auto = "auto"  # bf16 (fp16 without bf16) on a GPU without DP; off on a CPU and under DP
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class ClassWeighting(StrEnum):
    """Weights of the classes in the loss (``train.class_weighting``)."""

    none = "none"
    balanced = "balanced"


class SSLMethod(StrEnum):
    """Self-supervised pretraining method (``ssl.method``)."""

    simclr = "simclr"
    mim = "mim"


class Task(StrEnum):
    """What a run trains (``task``)."""

    classify = "classify"
    ssl = "ssl"


class PrivacyMechanism(StrEnum):
    """The privacy mechanism the coordinator requests (``privacy.name``; also the ``privacy`` group's options)."""

    none = "none"
    dp = "dp"
    central_dp = "central_dp"
    distributed_dp = "distributed_dp"


class Accountant(StrEnum):
    """DP-SGD's privacy accountant (``privacy.accountant``)."""

    rdp = "rdp"  # Opacus' RDP analysis (its PRV accountant needs huge memory at small noise)


class GradSampleMode(StrEnum):
    """How Opacus computes per-sample gradients (``privacy.grad_sample_mode``)."""

    hooks = "hooks"
    ghost = "ghost"


def _values(choices: type[StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in choices)


# The allowed values as plain strings, in declaration order (error messages list them in this order).
PARTITIONS = _values(Partition)
ATTACKS = _values(Attack)
FINETUNE_MODES = _values(FinetuneMode)
MODEL_NORMS = _values(ModelNorm)
SCATTER_HEADS = _values(ScatterHead)
LOCAL_LAYERS = _values(LocalLayers)
OPTIMIZERS = _values(Optimizer)
LR_SCHEDULES = _values(LRSchedule)
CLASS_WEIGHTINGS = _values(ClassWeighting)
AMP_MODES = _values(AmpMode)
SSL_METHODS = _values(SSLMethod)
TASKS = _values(Task)
PRIVACY_MECHANISMS = _values(PrivacyMechanism)
ACCOUNTANTS = _values(Accountant)
GRAD_SAMPLE_MODES = _values(GradSampleMode)
