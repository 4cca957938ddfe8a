"""The sets of allowed strings of the config (``federation.partition``, ``train.optimizer`` ...)."""

from __future__ import annotations

import logging

__all__ = [
    "ACCOUNTANTS",
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
    "SSL_METHODS",
    "TASKS",
]

logger = logging.getLogger(__name__)

PARTITIONS = ("iid", "dirichlet", "quantity")
ATTACKS = ("none", "scale", "noise")  # simulated poisoning (federation.attack)
FINETUNE_MODES = ("full", "partial", "linear_probe")  # which layers train (model.finetune)
MODEL_NORMS = ("group", "batch")  # the normalisation after each convolution (model.norm)
LOCAL_LAYERS = ("none", "norm", "head", "norm_head")  # layers a hospital keeps to itself (personalize.local_layers)
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTINGS = ("none", "balanced")
SSL_METHODS = ("simclr", "mim")
TASKS = ("classify", "ssl")
PRIVACY_MECHANISMS = ("none", "dp", "central_dp")
ACCOUNTANTS = ("rdp",)  # Opacus' RDP analysis (its PRV accountant needs huge memory at small noise)
GRAD_SAMPLE_MODES = ("hooks", "ghost")
