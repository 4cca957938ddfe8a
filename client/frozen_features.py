"""Fixed features, computed once per site: only the head of a model with a fixed front end trains.

Two kinds of model have a front end that training never changes: ``model=scatternet`` (a wavelet transform with no
weights) and any model with ``model.finetune=linear_probe`` (a frozen, e.g. publicly pretrained, encoder). For them
a hospital computes the features of its training images once per training call (a scatternet's once per site: they
are kept in its own cache folder, derived from its images and never leaving the site) and trains the head on them:
a DP step is then a step of a small linear layer or CNN, not of the whole network.

Augmentation multiplicity (``train.aug_views`` = V > 1, De et al. 2022): the cached features hold V views of each
image (the image itself and V-1 augmentations drawn once, seeded, with ``train.augment``'s settings), shaped
``(N, V, F, ...)``; the head gives per-view logits and :class:`ViewMeanCrossEntropy` averages the views' losses of
each image, so its one per-sample gradient (the one DP-SGD clips) is the mean of its views' gradients. Every view
is training on the hospital's data inside its ledger: the views add no privacy cost because each image still
contributes one clipped gradient per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from medfed.common.atomic import atomic_write
from medfed.common.config import AugmentConfig
from medfed.common.data import ArrayDataset, build_augmentation
from medfed.common.data.image_files import iter_chunks
from medfed.common.models.scatternet import ScatterNet
from medfed.common.models.smallcnn import PooledClassifier
from torch import nn

__all__ = ["FeatureArrays", "FrozenHead", "ViewMeanCrossEntropy", "frozen_head", "has_fixed_front_end"]

logger = logging.getLogger(__name__)

_BATCH = 256  # images per forward pass of the front end


class _ScatterHead(nn.Module):
    """A scatternet's head alone (the module DP-SGD wraps): features ``(B, [V,] F, ...)`` -> ``(B, V, classes)``."""

    def __init__(self, model: ScatterNet) -> None:
        super().__init__()
        self.model = model  # its only parameters are the head's; the front end is not a submodule

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head_views(features)


class _ProbeHead(nn.Module):
    """A frozen encoder's linear head alone: pooled features ``(B, [V,] F)`` -> ``(B, V, classes)``."""

    def __init__(self, model: PooledClassifier) -> None:
        super().__init__()
        self.dropout, self.head = model.dropout, model.head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:
            features = features.unsqueeze(1)
        return self.head(self.dropout(features))


class ViewMeanCrossEntropy(nn.Module):
    """Cross-entropy of per-view logits ``(B, V, C)``: each image's loss is the mean over its views, reduced over the
    batch by ``reduction`` (``mean``, ``sum``, or ``none`` for one loss per image: DP-SGD's per-sample loss is then
    the view mean)."""

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.weight, self.reduction = weight, reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 2:
            logits = logits.unsqueeze(1)
        b, v, c = logits.shape
        per_view = nn.functional.cross_entropy(logits.reshape(b * v, c), labels.repeat_interleave(v),
                                               weight=self.weight, reduction="none").reshape(b, v)
        per_image = per_view.mean(dim=1)
        if self.reduction == "none":  # one loss per image (Opacus' ghost clipping reduces them itself)
            return per_image
        return per_image.sum() if self.reduction == "sum" else per_image.mean()


@dataclass(frozen=True)
class FeatureArrays(ArrayDataset):
    """A training split's fixed features ``(N, [V,] F, ...)`` (any rank) and its labels, trained on like images."""

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"features {self.images.shape} and labels {self.labels.shape} do not match.")


@dataclass(frozen=True)
class FrozenHead:
    """What trains instead of the whole model: the head, and the training split's cached features as its data."""

    head: nn.Module
    data: ArrayDataset  # features (N, [V,] F, ...) float32 and the labels


def has_fixed_front_end(model: nn.Module) -> bool:
    """Whether only the model's head trains on features that no training step changes."""
    return _front_end(model) is not None


def _front_end(model: nn.Module) -> tuple[nn.Module, str | None] | None:
    """The head module and the identity of the fixed front end (the feature cache's key; None for a frozen encoder,
    whose features are not cached: it travels with the model and FedAvg's weighted sum does not give it back bit
    for bit), or None when the whole model trains."""
    if isinstance(model, ScatterNet):
        return _ScatterHead(model), model.front_key()
    if isinstance(model, PooledClassifier) and all(
        not p.requires_grad for n, p in model.named_parameters() if not n.startswith("head.")
    ) and any(p.requires_grad for p in model.head.parameters()):
        return _ProbeHead(model), None
    return None


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if isinstance(model, ScatterNet):
        return model.front_features(images)
    assert isinstance(model, PooledClassifier)  # (only the two kinds _front_end accepts get here)
    return model.forward_features(images)


def _views(data: ArrayDataset, views: int, augment: AugmentConfig, spatial_dims: int, seed: int) -> list[np.ndarray]:
    """The images, then ``views - 1`` augmented copies (each image's augmentations seeded by ``seed``)."""
    out = [data.images]
    if views > 1:
        transform = build_augmentation(dataclasses.replace(augment, enabled=True), spatial_dims, seed=seed)
        assert transform is not None  # (enabled above)
        for _ in range(views - 1):
            out.append(np.stack([transform(torch.from_numpy(np.array(image, dtype=np.float32)))
                                 .numpy() for image in data.images]).astype(np.float32))
    return out


def frozen_head(
    model: nn.Module,
    data: ArrayDataset,
    *,
    views: int,
    augment: AugmentConfig,
    spatial_dims: int,
    seed: int,
    cache_dir: Path | None,
    device: torch.device,
) -> FrozenHead | None:
    """The head and the training split's features when ``model`` has a fixed front end, else None.

    The features are read from ``cache_dir`` when an earlier round (or run) computed them for the same images,
    front end, views and seed, else computed (in eval mode, without gradients) and written there atomically. Only a
    scatternet's features are cached: a frozen encoder's are computed each call (see :func:`_front_end`).
    """
    found = _front_end(model)
    if found is None:
        return None
    head, front = found
    path = None
    if front is not None and cache_dir is not None:  # (a frozen encoder's features: one forward pass per call)
        digest = hashlib.sha256()
        for part in (front, str(views), str(seed), repr(augment) if views > 1 else "", str(data.images.shape)):
            digest.update(part.encode())
        for chunk in iter_chunks(data.images):  # (a chunk at a time: the images may be on disk)
            digest.update(chunk.tobytes())
        path = cache_dir / f"features-{digest.hexdigest()[:24]}.npy"
    if path is not None and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == len(data):
                return FrozenHead(head, FeatureArrays(images=cached, labels=data.labels))
        except (OSError, ValueError) as exc:
            logger.warning("Ignoring an unreadable feature cache file (%s); computing the features again.",
                           type(exc).__name__)
    was_training = model.training
    model.eval()
    per_view = []
    with torch.no_grad():
        for images in _views(data, views, augment, spatial_dims, seed):
            chunks = [_features(model, torch.from_numpy(np.ascontiguousarray(images[i:i + _BATCH])).to(device)).cpu()
                      for i in range(0, len(images), _BATCH)]
            per_view.append(torch.cat(chunks).numpy().astype(np.float32))
    model.train(was_training)
    features = per_view[0] if views == 1 else np.stack(per_view, axis=1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            np.save(handle, features, allow_pickle=False)
    logger.info("computed the fixed features of %d training images x %d view(s)", len(data), views)
    return FrozenHead(head, FeatureArrays(images=features, labels=data.labels))
