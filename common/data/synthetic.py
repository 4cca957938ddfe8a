"""An offline synthetic imaging task for demos and tests, whose hospitals differ like scanners do.

Every image is a smooth random background texture plus noise. Class ``k > 0`` adds a bright lesion-like blob whose
size depends on the class, at a jittered location and with a random (sometimes faint) contrast; class 0 carries
at most a faint distractor blob. A small CNN learns it in a few federated rounds, but faint lesions keep it from
being trivially separable. Works for any number of classes, 1 or 3 channels, 2D or 3D, any size >= 8.

:func:`scanner_effect` gives each simulated hospital its own gain, offset, gamma and noise level; the global test
set mixes ten such scanner styles so that it is not one site's style. Everything is vectorised numpy and
deterministic from the seed.
"""

from __future__ import annotations

import logging

import numpy as np

from medfed.common.config import SyntheticConfig
from medfed.common.data.arrays import ArrayDataset, DatasetInfo, DatasetSplits

__all__ = ["TEST_SCANNER_STYLES", "load_synthetic", "scanner_effect"]

logger = logging.getLogger(__name__)

TEST_SCANNER_STYLES = 10  # the global test set mixes the scanner styles of sites 0..9
_SEED_MASK = (1 << 63) - 1
_NOISE_SIGMA = 0.05


def _seed_words(*values: int) -> list[int]:
    """Non-negative seed words for numpy's SeedSequence (negative seeds map to distinct values)."""
    return [int(v) & _SEED_MASK for v in values]


def _axes(size: int, dims: int) -> list[np.ndarray]:
    """Pixel-centre coordinates in [0, 1] along each spatial axis, shaped to broadcast against ``(N, *spatial)``."""
    line = (np.arange(size, dtype=np.float32) + 0.5) / size
    out = []
    for axis in range(dims):
        shape = [1] * (dims + 1)
        shape[axis + 1] = size
        out.append(line.reshape(shape))
    return out


def _generate(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> ArrayDataset:
    dims, size, k = cfg.spatial_dims, cfg.image_size, cfg.n_classes
    axes = _axes(size, dims)
    col = (n,) + (1,) * dims  # per-sample scalars broadcast over the spatial axes
    labels = rng.permutation(np.arange(n, dtype=np.int64) % k)

    # Smooth background: a base level plus three random low-frequency plane waves.
    image = np.broadcast_to(rng.uniform(0.25, 0.45, n).astype(np.float32).reshape(col), (n,) + (size,) * dims).copy()
    for _ in range(3):
        direction = rng.normal(size=(n, dims)).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-6
        freq = rng.uniform(0.5, 2.5, n).astype(np.float32)
        phase = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32).reshape(col)
        amp = rng.uniform(0.01, 0.05, n).astype(np.float32).reshape(col)
        arg = sum(((2 * np.pi * freq * direction[:, a]).reshape(col) * axes[a] for a in range(dims)), phase)
        image += amp * np.cos(arg)

    # Lesion: class k > 0 -> blob of class-specific radius and random contrast; class 0 -> faint distractor.
    radii = np.linspace(0.15, 0.25, max(k - 1, 1), dtype=np.float32)
    radius = np.where(labels > 0, radii[np.maximum(labels - 1, 0)], rng.uniform(0.04, 0.1, n)).astype(np.float32)
    radius *= rng.uniform(0.85, 1.15, n).astype(np.float32)
    contrast = np.where(labels > 0, rng.uniform(0.3, 0.7, n), rng.uniform(0.0, 0.12, n)).astype(np.float32)
    centre = rng.uniform(0.3, 0.7, size=(n, dims)).astype(np.float32)
    dist2 = sum((axes[a] - centre[:, a].reshape(col)) ** 2 for a in range(dims))
    image += contrast.reshape(col) * np.exp(-dist2 / (2 * radius.reshape(col) ** 2))

    # Channels: a per-sample tint per channel and independent noise on each.
    tint = rng.uniform(0.9, 1.1, size=(n, cfg.channels)).astype(np.float32) if cfg.channels > 1 else None
    images = np.repeat(image[:, None], cfg.channels, axis=1)
    if tint is not None:
        images *= tint.reshape((n, cfg.channels) + (1,) * dims)
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)
    np.clip(images, 0.0, 1.0, out=images)
    return ArrayDataset(images=images, labels=labels)


def scanner_effect(images: np.ndarray, site: int, seed: int) -> np.ndarray:
    """Render ``images`` (float32 in [0, 1]) as scanner ``site`` would: its own gain, offset, gamma and noise.

    The scanner's parameters depend only on ``(site, seed)``; the output is float32, clipped to ``[0, 1]``.
    """
    rng = np.random.default_rng(np.random.SeedSequence(_seed_words(seed, site, 0x5CA11E)))
    gain = np.float32(rng.uniform(0.75, 1.25))
    offset = np.float32(rng.uniform(-0.08, 0.08))
    gamma = np.float32(np.exp(rng.uniform(-0.35, 0.35)))
    noise = np.float32(rng.uniform(0.0, 0.04))
    out = np.power(np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0), gamma)
    out *= gain
    out += offset
    out += rng.standard_normal(out.shape, dtype=np.float32) * noise
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def _mixed_scanners(data: ArrayDataset, seed: int, rng: np.random.Generator) -> ArrayDataset:
    """Each sample rendered by one of ``TEST_SCANNER_STYLES`` scanners, drawn deterministically."""
    sites = rng.integers(0, TEST_SCANNER_STYLES, len(data))
    images = np.empty_like(data.images)
    for site in np.unique(sites):
        mask = sites == site
        images[mask] = scanner_effect(data.images[mask], int(site), seed)
    return ArrayDataset(images=images, labels=data.labels)


def load_synthetic(cfg: SyntheticConfig) -> DatasetSplits:
    """Generate the synthetic task: a clean development pool and a test set mixing ten scanner styles."""
    train_ss, test_ss, mix_ss = np.random.SeedSequence(_seed_words(cfg.seed, 0x5E7)).spawn(3)
    train = _generate(cfg.n_train, cfg, np.random.default_rng(train_ss))
    test = _mixed_scanners(_generate(cfg.n_test, cfg, np.random.default_rng(test_ss)), cfg.seed,
                           np.random.default_rng(mix_ss))
    info = DatasetInfo(
        name=cfg.name,
        n_classes=cfg.n_classes,
        channels=cfg.channels,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
        class_names=tuple(str(i) for i in range(cfg.n_classes)),
        simulate_scanners=True,
    )
    logger.debug("Generated synthetic task: %d train, %d test, info %s", len(train), len(test), info)
    return DatasetSplits(info=info, train=train, test=test)
