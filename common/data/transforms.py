"""Training-time augmentation (``train.augment``), and torch views of :class:`ArrayDataset`.

Both forms draw random flips along every spatial axis, a small rotation (about every axis in 3D) with a zoom (one
resampling), and intensity scaling/shifting:

- :class:`BatchAugmentation` (training, every step): a whole batch at once on its device, each image its own draws.
- :func:`build_augmentation`: a MONAI ``Compose`` for one channel-first sample (the views of augmentation
  multiplicity, drawn once per site and cached with a fixed front end's features).

Neither modifies the stored arrays or the tensors it is given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from medfed.common.config import AugmentConfig
from medfed.common.data.arrays import ArrayDataset
from medfed.common.errors import ConfigError

__all__ = ["BatchAugmentation", "build_augmentation", "build_batch_augmentation",
           "to_tensor_dataset"]

logger = logging.getLogger(__name__)


def build_augmentation(
    cfg: AugmentConfig, spatial_dims: int, *, seed: int = 0
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A seeded MONAI ``Compose`` for one channel-first sample, or ``None`` when ``cfg.enabled`` is false."""
    if not cfg.enabled:
        return None
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims={spatial_dims!r} is not supported by the augmentation; use 2 or 3.")
    from monai.transforms import (
        Compose,
        EnsureType,
        RandAffine,
        RandFlip,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    steps: list[Callable[..., object]] = [EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False)]
    if cfg.flip_prob > 0:
        steps += [RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
    if cfg.prob > 0 and (cfg.rotate_deg > 0 or cfg.scale > 0):
        # Rotation and zoom in one RandAffine: a single resampling (less blur) at ~40% of the cost of
        # RandRotate + RandZoom (measured: 2D 1.0 ms vs 2.6 ms, 3D 2.1 ms vs 4.0 ms per 28 px sample).
        angle = math.radians(cfg.rotate_deg)
        steps.append(
            RandAffine(
                prob=cfg.prob,
                rotate_range=(angle,) if spatial_dims == 2 else (angle, angle, angle),
                scale_range=(cfg.scale,) * spatial_dims,
                padding_mode="border",
            )
        )
    if cfg.prob > 0 and cfg.intensity > 0:
        steps.append(RandScaleIntensity(factors=cfg.intensity, prob=cfg.prob))
        steps.append(RandShiftIntensity(offsets=cfg.intensity, prob=cfg.prob))
    steps.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    compose = Compose(steps)
    compose.set_random_state(seed=seed)
    logger.debug("Augmentation for %dD: %s", spatial_dims, [type(s).__name__ for s in steps])

    return _Augment(compose)


class _Augment:
    """A picklable callable that returns a plain float32 tensor (MONAI's output may carry metadata)."""

    def __init__(self, compose: Callable[[torch.Tensor], object]) -> None:
        self.compose = compose

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.compose(image)
        if not isinstance(out, torch.Tensor):  # pragma: no cover - EnsureType guarantees a tensor
            out = torch.as_tensor(np.asarray(out))
        return out.as_subclass(torch.Tensor).to(torch.float32).contiguous()


class BatchAugmentation:
    """``train.augment`` for a whole batch ``(N, C, *spatial)`` at once, each image with its own draws: the same
    random flips, rotation with zoom (one resampling, border padding) and intensity scale/shift as
    :func:`build_augmentation`, in a few tensor operations on the batch's device instead of a MONAI ``Compose``
    per image (which cost 2.6 x a BreastMNIST run's wall time on 2 CPU cores). The draws come from a CPU generator
    seeded by ``seed``, so a run is reproducible on any device. Images are returned as new tensors."""

    def __init__(self, cfg: AugmentConfig, spatial_dims: int, *, seed: int = 0) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} is not supported by the augmentation; use 2 or 3.")
        self.cfg, self.dims = cfg, spatial_dims
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, n: int, half_width: float, *shape: int) -> torch.Tensor:
        return (torch.rand(n, *shape, generator=self.generator, dtype=torch.float64) * 2 - 1) * half_width

    def _chosen(self, n: int, prob: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < prob

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, cfg, dims = images.shape[0], self.cfg, self.dims
        if images.dim() != dims + 2:
            raise ValueError(f"BatchAugmentation({dims}D) takes batches shaped (N, C, *{dims} sizes), "
                             f"got {tuple(images.shape)}.")
        out = images.to(torch.float32)
        if n == 0:
            return out.clone()
        view = (n,) + (1,) * (dims + 1)
        if cfg.flip_prob > 0:
            for axis in range(dims):
                flip = self._chosen(n, cfg.flip_prob).to(out.device).view(view)
                out = torch.where(flip, out.flip(axis + 2), out)
        if cfg.prob > 0 and (cfg.rotate_deg > 0 or cfg.scale > 0):
            out = self._affine(out, self._chosen(n, cfg.prob))
        if cfg.prob > 0 and cfg.intensity > 0:
            factor = 1 + self._uniform(n, cfg.intensity) * self._chosen(n, cfg.prob)
            shift = self._uniform(n, cfg.intensity) * self._chosen(n, cfg.prob)
            out = out * factor.to(out).view(view) + shift.to(out).view(view)
        return out if out is not images else out.clone()

    def _affine(self, images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Rotate (about every axis in 3D) and zoom the chosen images about their centres: ``affine_grid`` maps
        each output pixel to the input in coordinates normalised to [-1, 1], so the rotation is taken between
        pixel units (``half`` the sizes) to stay a rotation on non-square images."""
        n, dims = images.shape[0], self.dims
        angle = self._uniform(n, math.radians(self.cfg.rotate_deg), 1 if dims == 2 else 3)
        zoom = 1 + self._uniform(n, self.cfg.scale, dims)
        rotation = _rotations(angle, dims)  # (n, dims, dims), in (x, y[, z]) order as affine_grid wants
        # (x, y[, z]) are the last spatial axes reversed
        half = torch.tensor([s / 2 for s in reversed(images.shape[2:])], dtype=torch.float64)
        matrix = torch.diag_embed(1 / half) @ rotation @ torch.diag_embed(half / zoom)
        identity = torch.eye(dims, dtype=torch.float64).expand(n, dims, dims)
        matrix = torch.where(chosen.view(n, 1, 1), matrix, identity)
        theta = torch.cat([matrix, torch.zeros(n, dims, 1, dtype=torch.float64)], dim=2).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return torch.where(chosen.to(images.device).view((n,) + (1,) * (dims + 1)), moved, images)


def _rotations(angle: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotation matrices from angles ``(n, 1)`` in 2D or ``(n, 3)`` (about x, y, z, applied in that order) in 3D."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    if dims == 2:
        return torch.stack([torch.stack([cos[:, 0], -sin[:, 0]], -1), torch.stack([sin[:, 0], cos[:, 0]], -1)], -2)
    c, s = cos.unbind(1), sin.unbind(1)
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c[0], -s[0]], -1),
                      torch.stack([zero, s[0], c[0]], -1)], -2)
    ry = torch.stack([torch.stack([c[1], zero, s[1]], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-s[1], zero, c[1]], -1)], -2)
    rz = torch.stack([torch.stack([c[2], -s[2], zero], -1), torch.stack([s[2], c[2], zero], -1),
                      torch.stack([zero, zero, one], -1)], -2)
    return rz @ ry @ rx


def build_batch_augmentation(cfg: AugmentConfig, spatial_dims: int, *, seed: int = 0) -> BatchAugmentation | None:
    """The per-step training augmentation (:class:`BatchAugmentation`), or ``None`` when ``cfg.enabled`` is false."""
    return BatchAugmentation(cfg, spatial_dims, seed=seed) if cfg.enabled else None


def to_tensor_dataset(data: ArrayDataset) -> TensorDataset:
    """Wrap the arrays as a ``TensorDataset`` sharing their memory (a copy only if not float32/int64 or read-only)."""
    images = np.require(data.images, dtype=np.float32, requirements=["C", "W"])
    labels = np.require(data.labels, dtype=np.int64, requirements=["C", "W"])
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
