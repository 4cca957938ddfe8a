"""Batched inference: class probabilities and evaluation metrics of a model on an image array (in memory, or a
site's images on disk, :class:`~medfed.common.data.image_files.ImageFiles`, read a batch at a time).

Images are expected already preprocessed (float, scaled the way the model was trained), shaped
``(N, C, H, W)`` or ``(N, C, D, H, W)``. The model runs in eval mode under ``torch.no_grad()``; the train/eval
flag of every submodule is restored afterwards, so a training loop can call :func:`evaluate` mid-epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from medfed.common.metrics import classification_metrics

__all__ = ["eval_mode", "evaluate", "predict_logits", "predict_proba", "softmax"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every submodule's train/eval flag is restored afterwards (so a
    training loop can evaluate mid-epoch)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    stochastic: bool = False,
) -> np.ndarray:
    """Logits ``(N, n_classes)`` as float64 numpy.

    The model is moved to ``device`` (and stays there); batches of ``images`` are sent there as float32. With
    ``stochastic`` its dropout layers stay active (one Monte-Carlo dropout pass; seed torch beforehand).

    Raises:
        ValueError: ``batch_size < 1``, empty ``images``, or ``images`` without a batch and channel axis.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is out of range; it must be an int >= 1.")
    # an array, or the site's images on disk (ImageFiles): read one batch at a time
    array = images if hasattr(images, "image_shape") else np.asarray(images)
    if array.ndim < 3:
        raise ValueError(
            f"images must have shape (N, C, H, W) or (N, C, D, H, W); got shape {array.shape}."
        )
    if array.shape[0] == 0:
        raise ValueError("images is empty (N=0); there is nothing to predict.")
    torch_device = torch.device(device)
    model.to(torch_device)
    outputs: list[np.ndarray] = []
    with eval_mode(model), torch.no_grad():
        if stochastic:
            for module in model.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.train()
        for start in range(0, array.shape[0], batch_size):
            batch = torch.as_tensor(np.asarray(array[start : start + batch_size]), dtype=torch.float32,
                                    device=torch_device)
            outputs.append(model(batch).double().cpu().numpy())
    return np.concatenate(outputs, axis=0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits / temperature`` (rows), computed stably in float64.

    Raises:
        ValueError: ``temperature`` not a finite number > 0.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} is out of range; it must be a finite number > 0.")
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    temperature: float = 1.0,
) -> np.ndarray:
    """Softmax class probabilities ``(N, n_classes)`` as float64 numpy, of the logits divided by ``temperature``
    (1: the model as trained; a fitted temperature calibrates it). See :func:`predict_logits`."""
    return softmax(predict_logits(model, images, batch_size=batch_size, device=device), temperature)


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """:func:`~common.metrics.classification_metrics` of the model's probabilities on ``images`` vs ``labels``.

    Raises:
        ValueError: the number of labels differs from the number of images, or any error of the two functions.
    """
    labels_array = np.asarray(labels).reshape(-1)
    n_images = len(images) if hasattr(images, "image_shape") else (
        int(np.asarray(images).shape[0]) if np.ndim(images) > 0 else 0)
    if labels_array.size != n_images:
        raise ValueError(f"labels has {labels_array.size} entries but images has {n_images}; they must match.")
    probs = predict_proba(model, images, batch_size=batch_size, device=device)
    return classification_metrics(labels_array, probs)
