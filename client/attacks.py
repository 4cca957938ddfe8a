"""Simulated poisoning for robustness experiments: the update a simulated attacker sends instead of its own.

Only simulated hospitals (a partition index below ``federation.attackers``) ever attack; a deployed hospital has
no partition index, so this never changes what a real site sends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from medfed.common.config import FederationConfig

__all__ = ["poison"]

logger = logging.getLogger(__name__)


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
