"""Networks of medfed (2D and 3D, GroupNorm, no in-place ops, so Opacus accepts them) and their weights.

Importing this package registers the built-in models (``smallcnn``, ``resnet18``, ``scatternet``, ``densenet121``) in
the registry; it does no I/O. Build one with :func:`build_model`; move weights with the helpers of
:mod:`common.models.weights`.
"""

from __future__ import annotations

import logging

from medfed.common.models.registry import available_models, build_model, register_model, require_dp_compatible

# Imported for their side effect: each module registers its factory with @register_model.
from medfed.common.models import monai_nets as monai_nets  # noqa: E402
from medfed.common.models import resnet as resnet  # noqa: E402  (after the registry, on purpose)
from medfed.common.models import scatternet as scatternet
from medfed.common.models import smallcnn as smallcnn  # noqa: E402
from medfed.common.models.resnet import ResNet18
from medfed.common.models.smallcnn import SmallCNN, group_norm
from medfed.common.models.weights import (
    get_weights,
    load_checkpoint,
    load_state_dict_numpy,
    save_checkpoint,
    set_weights,
    state_dict_to_numpy,
)

__all__ = [
    "ResNet18",
    "SmallCNN",
    "available_models",
    "build_model",
    "get_weights",
    "group_norm",
    "load_checkpoint",
    "load_state_dict_numpy",
    "register_model",
    "require_dp_compatible",
    "save_checkpoint",
    "set_weights",
    "state_dict_to_numpy",
]

logger = logging.getLogger(__name__)
