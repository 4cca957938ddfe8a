"""Schema of self-supervised pretraining (``task=ssl``): the ``ssl`` section."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medfed.common.config.checks import require_choice, require_fraction, require_positive
from medfed.common.config.choices import SSL_METHODS, SSLMethod
from medfed.common.errors import ConfigError

__all__ = [
    "SSLConfig",
]

logger = logging.getLogger(__name__)


@dataclass
class SSLConfig:
    """Self-supervised pretraining (``task=ssl``): SimCLR-style contrastive learning or masked image modelling."""

    # simclr (contrastive, two random views per image) | mim (masked image modelling; works with DP)
    method: SSLMethod = SSLMethod.simclr
    temperature: float = 0.2  # SimCLR's NT-Xent temperature (0.2 beat 0.5 on PneumoniaMNIST, docs/benchmarks.md)
    projection_dim: int = 64  # SimCLR's projector output
    mask_ratio: float = 0.5  # MIM: the fraction of patches hidden
    patch_size: int = 4  # MIM: the side of a hidden square (cube), pixels

    def __post_init__(self) -> None:
        require_choice("ssl.method", self.method, SSL_METHODS)
        require_positive("ssl.temperature", self.temperature)
        require_fraction("ssl.mask_ratio", self.mask_ratio, high_open=True)
        for key in ("projection_dim", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ssl.{key}={value!r} is out of range; it must be an integer >= 1.")
