"""A hospital's hardware check at every message, before it trains: its device, and whether the model fits it.

The device is the site's (``device`` in its site config) or, in simulation, the recipe's ``train.device``; the
memory is what the site declares (``device_memory_gb``; ``train.device_memory_gb`` in simulation) or what the device
has (:func:`~medfed.common.hardware.available_memory`; a simulated hospital sharing a GPU through
``federation.gpus_per_hospital`` counts its share). A model whose training would not fit is refused with a
:class:`~medfed.common.errors.PolicyRefusal` saying how much memory it needs and how to make it fit; the text names
config keys and sizes only, never a path, so it may leave the site. The check runs on the first message a hospital
answers (the initial evaluation, or round 1), before anything is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from medfed.client.node import NodeEnv
from medfed.common.config import Config
from medfed.common.errors import PolicyRefusal
from medfed.common.hardware import (
    available_memory,
    configure_backend,
    estimate_for_config,
    fit_problem,
    resolve_device,
)

__all__ = ["check_hardware", "hospital_memory", "site_device"]

logger = logging.getLogger(__name__)


def site_device(cfg: Config, env: NodeEnv) -> torch.device:
    """The device this hospital trains and evaluates on (``cfg`` as :meth:`NodeEnv.recipe` made it)."""
    return resolve_device(str(cfg.train.device), key="train.device" if env.hardware is None else "device")


def hospital_memory(cfg: Config, env: NodeEnv, device: torch.device) -> tuple[int | None, str]:
    """Bytes this hospital's training may use on ``device``, and where that figure comes from (for messages)."""
    declared = float(cfg.train.device_memory_gb)
    key = "train.device_memory_gb" if env.hardware is None else "device_memory_gb in its site config"
    available = available_memory(device, declared)
    source = f"{key}: {declared:g} GiB" if declared > 0 else "detected"
    share = cfg.federation.gpus_per_hospital
    if env.simulated and device.type == "cuda" and 0 < share < 1 and available is not None:
        available = int(available * share)  # hospitals sharing a GPU (Ray's fractions do not split its memory)
        source += f", its share federation.gpus_per_hospital={share:g} of the GPU"
    return available, source


def check_hardware(cfg: Config, env: NodeEnv, model: nn.Module, input_shape: Sequence[int]) -> torch.device:
    """Resolve the hospital's device, set up its backend and refuse a model that cannot train within its memory.

    Raises:
        ConfigError: a device this machine does not have.
        PolicyRefusal: training would need more memory than the device offers (the text says how much, and what
            makes it fit).
    """
    device = site_device(cfg, env)
    configure_backend(device, env.cudnn_benchmark)
    estimate = estimate_for_config(cfg, model, input_shape, device)
    available, source = hospital_memory(cfg, env, device)
    logger.debug("training memory on %s: about %d bytes needed, %s available (%s)", device, estimate.required,
                 available, source)
    problem = fit_problem(estimate, available, f"This hospital refuses the run on {device} ({source})")
    if problem is not None:
        raise PolicyRefusal(problem)
    return device
