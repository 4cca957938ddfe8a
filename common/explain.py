"""Grad-CAM maps (MONAI's :class:`monai.visualize.GradCAM`) of a model's predictions, and their overlay images.

A map shows which parts of an image drove the predicted class: the gradient-weighted activations of the encoder's
last convolutional stage, upsampled to the image and scaled to [0, 1] per image. Maps are *local* outputs: they
hold the image's anatomy, so a hospital computes and keeps them (``medfed hospital explain``, or the end of a run
with ``evaluate.gradcam_samples``); nothing here is ever put into a Flower message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.common.errors import ConfigError
from medfed.common.inference import eval_mode

__all__ = ["default_target_layer", "gradcam_maps", "overlay_rgb", "save_explanations"]

logger = logging.getLogger(__name__)


def default_target_layer(model: nn.Module) -> str:
    """The dotted name of the encoder's last stage with weights (``encoder.block3_1`` for ``smallcnn``,
    ``encoder.layer4`` for ``resnet18``): the finest-semantics, still spatial, feature map.

    Raises:
        ConfigError: the model has no ``encoder`` with a weighted stage (name a layer explicitly then).
    """
    from medfed.common.models.registry import last_encoder_stage

    return last_encoder_stage(model)


def gradcam_maps(
    model: nn.Module,
    images: np.ndarray,
    *,
    target_layer: str | None = None,
    class_index: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Grad-CAM maps ``(N, *spatial)`` in [0, 1], one per image of ``images`` ``(N, C, *spatial)``.

    ``class_index`` None explains each image's predicted class. The model's train/eval flags are restored.

    Raises:
        ConfigError: ``target_layer`` is not a module of the model.
    """
    from monai.visualize import GradCAM

    layer = target_layer or default_target_layer(model)
    names = {name for name, _ in model.named_modules()}
    if layer not in names:
        raise ConfigError(
            f"Grad-CAM layer {layer!r} is not a module of {type(model).__name__}; choose one of its stages, e.g. "
            f"{default_target_layer(model)!r}."
        )
    array = np.asarray(images, dtype=np.float32)
    if array.ndim < 4 or array.shape[0] == 0:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, C, D, H, W) with N >= 1; got {array.shape}.")
    torch_device = torch.device(device)
    model.to(torch_device)
    cam = GradCAM(nn_module=model, target_layers=layer)
    maps: list[np.ndarray] = []
    try:
        with eval_mode(model):
            for start in range(0, array.shape[0], batch_size):
                batch = torch.as_tensor(array[start : start + batch_size], device=torch_device)
                result = cam(batch, class_idx=class_index)
                maps.append(result.detach().cpu().numpy()[:, 0].astype(np.float32))
    finally:
        model.zero_grad(set_to_none=True)
    return np.nan_to_num(np.concatenate(maps), nan=0.0)


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the middle slice of a volume along its first axis."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def overlay_rgb(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 picture ``(H, W, 3)`` of ``image`` ``(C, *spatial)`` (grey: the mean over channels, scaled to
    its own range) with ``cam`` ``(*spatial)`` in [0, 1] laid over it in the ``jet`` colours."""
    from matplotlib import colormaps

    grey = _middle_slice(np.asarray(image, dtype=np.float64).mean(axis=0))
    span = float(grey.max() - grey.min())
    grey = (grey - grey.min()) / span if span > 0 else np.zeros_like(grey)
    heat = colormaps["jet"](np.clip(_middle_slice(np.asarray(cam, dtype=np.float64)), 0.0, 1.0))[..., :3]
    rgb = (1.0 - alpha) * np.repeat(grey[..., None], 3, axis=-1) + alpha * heat
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def save_explanations(
    out_dir: Path,
    images: np.ndarray,
    maps: np.ndarray,
    names: Sequence[str],
    probs: np.ndarray | None = None,
) -> list[Path]:
    """Write, for each image, ``NAME.png`` (the overlay) and ``NAME.npy`` (the map) into ``out_dir``, plus
    ``index.csv`` (name, predicted class, its probability); returns the PNG paths."""
    from PIL import Image

    if not (len(names) == len(images) == len(maps)):
        raise ValueError(f"{len(names)} names for {len(images)} images and {len(maps)} maps; they must match.")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = ["name,predicted,probability"]
    for index, (name, image, cam) in enumerate(zip(names, images, maps, strict=True)):
        png = out_dir / f"{name}.png"
        Image.fromarray(overlay_rgb(image, cam)).save(png)
        np.save(out_dir / f"{name}.npy", np.asarray(cam, dtype=np.float32))
        written.append(png)
        if probs is not None:
            rows.append(f"{name},{int(np.argmax(probs[index]))},{float(np.max(probs[index])):.4f}")
        else:
            rows.append(f"{name},,")
    (out_dir / "index.csv").write_text("\n".join(rows) + "\n")
    return written
