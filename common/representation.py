"""How well an encoder separates the classes: silhouette score and Davies-Bouldin index of its embeddings of labelled
images, and a 2D PCA picture of them.

Silhouette (in [-1, 1], higher is better): per image, (b - a) / max(a, b) with ``a`` the mean distance to its own
class and ``b`` the mean distance to the nearest other class, averaged. Davies-Bouldin (>= 0, lower is better): the
mean over classes of the worst (s_i + s_j) / d(c_i, c_j), with ``s`` a class's mean distance to its centroid ``c``.
Both on L2-normalised embeddings (Euclidean distances), computed in numpy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfed.common.inference import eval_mode

__all__ = ["davies_bouldin", "embed", "pca_2d", "representation_quality", "silhouette"]

logger = logging.getLogger(__name__)


def embed(encoder: nn.Module, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The encoder's pooled features ``(N, D)`` of ``images`` (eval mode, no gradients), L2-normalised."""
    out = []
    with eval_mode(encoder), torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))
            out.append(encoder(batch).flatten(1).double().numpy())
    features = np.concatenate(out)
    return features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)


def _distances(x: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(axis=1)
    return np.sqrt(np.clip(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0, None))


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``x`` ``(N, D)`` by ``labels`` (nan with fewer than 2 classes). Singletons score 0."""
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    if classes.size < 2:
        return float("nan")
    d = _distances(np.asarray(x, dtype=np.float64))
    scores = np.zeros(labels.size)
    for i in range(labels.size):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == c].mean() for c in classes if c != labels[i])
        scores[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(scores.mean())


def davies_bouldin(x: np.ndarray, labels: np.ndarray) -> float:
    """Davies-Bouldin index of ``x`` by ``labels`` (nan with fewer than 2 classes)."""
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    if classes.size < 2:
        return float("nan")
    x = np.asarray(x, dtype=np.float64)
    centroids = np.stack([x[labels == c].mean(axis=0) for c in classes])
    spread = np.array([np.linalg.norm(x[labels == c] - centroids[k], axis=1).mean() for k, c in enumerate(classes)])
    worst = []
    for i in range(classes.size):
        ratios = [(spread[i] + spread[j]) / max(np.linalg.norm(centroids[i] - centroids[j]), 1e-12)
                  for j in range(classes.size) if j != i]
        worst.append(max(ratios))
    return float(np.mean(worst))


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of ``x`` ``(N, D)`` (centred, by SVD)."""
    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


MAX_IMAGES = 2000  # silhouette needs all pairwise distances: a seeded sample of larger sets keeps memory small


def representation_quality(
    encoder: nn.Module, images: np.ndarray, labels: np.ndarray, *, plot: Path | None = None, title: str = "",
    max_images: int = MAX_IMAGES,
) -> dict[str, Any]:
    """Silhouette and Davies-Bouldin of the encoder's embeddings by class (of a seeded sample of ``max_images``
    when there are more); with ``plot``, a PCA scatter PNG."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size > max_images:
        chosen = np.sort(np.random.default_rng(0).choice(labels.size, size=max_images, replace=False))
        images, labels = images[chosen], labels[chosen]
    features = embed(encoder, images)
    result: dict[str, Any] = {"silhouette": silhouette(features, labels),
                              "davies_bouldin": davies_bouldin(features, labels), "n": int(labels.size),
                              "dims": int(features.shape[1])}
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        points = pca_2d(features)
        fig, ax = plt.subplots(figsize=(5, 5))
        for c in np.unique(labels):
            ax.scatter(points[labels == c, 0], points[labels == c, 1], s=6, alpha=0.6, label=f"class {int(c)}")
        ax.set_title(title or "Test-set embeddings (PCA)")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend()
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=100)
        plt.close(fig)
        result["plot"] = plot.name
    return result
