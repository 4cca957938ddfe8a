"""What a hospital runs on its own machine with a trained model: Grad-CAM maps of any image, and the ranking of
its unlabelled images for labelling (active learning). Nothing here talks to the coordinator; outputs are files on
the hospital's disk.

A model file is a medfed checkpoint (a run's ``best_model.pt`` or ``model.pt``); the run's ``config.yaml`` beside
it names the architecture, and its ``summary.json`` (when present) the fitted temperature.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from torch import nn

from medfed.common.config import ModelConfig
from medfed.common.data.site_folder import image_entries, read_resized
from medfed.common.errors import ConfigError, MedfedError
from medfed.common.inference import predict_proba
from medfed.common.models import build_model, load_checkpoint, load_state_dict_numpy
from medfed.common.uncertainty import (
    dropout_rate,
    labelling_scores,
    mc_dropout_proba,
    predictive_entropy,
    rank_for_labelling,
)

__all__ = ["RANKING_METHODS", "LocalModel", "load_local_model", "predict", "read_images",
           "uncertainty_scores", "write_ranking"]

logger = logging.getLogger(__name__)

RANKING_METHODS = ("entropy", "margin", "mc_dropout", "random")


@dataclass
class LocalModel:
    """A trained model with the input it expects and its fitted temperature (1 when none was fitted)."""

    model: nn.Module
    spatial_dims: int
    channels: int
    n_classes: int
    image_size: int
    temperature: float


def _run_file(model_path: Path, given: Path | None, name: str) -> Path | None:
    path = given if given is not None else model_path.parent / name
    return path if path.is_file() else None


def load_local_model(model_path: Path, *, run_config: Path | None = None, image_size: int | None = None) -> LocalModel:
    """Build the model a checkpoint was trained as, with its weights.

    Raises:
        ConfigError: no run config beside the model (and none given), or no image size known.
        FileNotFoundError / IncompatibleUpdateError: an unreadable checkpoint, or weights that do not fit.
    """
    model_path = Path(model_path)
    arrays, _ = load_checkpoint(model_path)
    config_path = _run_file(model_path, run_config, "config.yaml")
    if config_path is None:
        raise ConfigError(
            f"{model_path.name} needs the config.yaml of the run that trained it (to rebuild the network); it is not "
            "beside the model file. Give it with --run-config RUN_DIR/config.yaml."
        )
    run_cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    model_cfg = ModelConfig(**run_cfg.get("model", {}))
    convs = [v for v in arrays.values() if v.ndim in (4, 5)]  # convolution kernels, the first one sees the input
    if not convs or "head.weight" not in arrays:
        raise ConfigError(f"{model_path.name} holds no convolution and head weights; is it a medfed classifier?")
    first = convs[0]
    spatial_dims, channels, n_classes = first.ndim - 2, int(first.shape[1]), int(arrays["head.weight"].shape[0])
    dataset = run_cfg.get("dataset", {})
    size = image_size or dataset.get("image_size") or dataset.get("size")
    if not size:
        raise ConfigError("the run config names no image size; give the model's input size with --image-size.")
    model = build_model(model_cfg, spatial_dims=spatial_dims, in_channels=channels, n_classes=n_classes)
    load_state_dict_numpy(model, dict(arrays))
    model.eval()
    temperature = 1.0
    summary_path = config_path.parent / "summary.json"
    if summary_path.is_file():
        fitted = (json.loads(summary_path.read_text(encoding="utf-8")).get("calibration") or {}).get("temperature")
        temperature = float(fitted) if fitted else 1.0
    return LocalModel(model, spatial_dims, channels, n_classes, int(size), temperature)


def read_images(path: Path, local: LocalModel) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Every readable image at ``path`` (a file, a series folder or a folder of images) as the model's input;
    returns the images, their paths relative to ``path``, and (path, reason) of those that could not be read.

    Raises:
        SiteDataError: no image there, or none readable.
    """
    from medfed.common.errors import SiteDataError

    root, entries = image_entries(path)
    images: list[np.ndarray] = []
    names: list[str] = []
    failed: list[tuple[str, str]] = []
    for entry in entries:
        try:
            images.append(read_resized(root, entry, local.image_size, local.spatial_dims, local.channels))
            names.append(entry.path)
        except MedfedError as exc:  # one bad file never stops the rest
            failed.append((entry.path, str(exc)))
    if not images:
        raise SiteDataError(f"none of the {len(entries)} image(s) could be read; the first reason: {failed[0][1]}")
    return np.stack(images).astype(np.float32), names, failed


def uncertainty_scores(
    local: LocalModel,
    images: np.ndarray,
    method: str,
    *,
    seed: int = 0,
    mc_samples: int = 20,
    probs: np.ndarray | None = None,
) -> np.ndarray:
    """Per image, how much labelling it would teach the model (higher: label it sooner).

    ``entropy``: predictive entropy; ``margin``: 1 - (top-1 - top-2 probability); ``mc_dropout``: the entropy of
    the mean of ``mc_samples`` dropout passes (needs a model with dropout); ``random``: a seeded random order (the
    baseline to compare with). ``probs``: the model's calibrated probabilities of ``images`` when the caller has
    them already (:func:`predict`).

    Raises:
        ConfigError: an unknown method, or MC dropout without dropout in the model.
    """
    if method not in RANKING_METHODS:
        raise ConfigError(f"ranking method {method!r} is unknown; choose one of: {', '.join(RANKING_METHODS)}.")
    if method == "mc_dropout":
        if dropout_rate(local.model) <= 0.0:
            raise ConfigError("--method mc_dropout needs a model trained with dropout (model.dropout > 0); use "
                              "--method entropy.")
        probs = mc_dropout_proba(local.model, images, samples=mc_samples, seed=seed,
                                 temperature=local.temperature).mean(axis=0)
        return predictive_entropy(probs)
    return labelling_scores(method, predict(local, images) if probs is None else probs,
                            np.random.default_rng(seed))


def write_ranking(out: Path, names: Sequence[str], scores: np.ndarray, probs: np.ndarray | None, method: str) -> None:
    """The labelling queue as CSV: rank, path, score, predicted class and its probability."""
    order = rank_for_labelling(scores)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "path", f"{method}_score", "predicted", "probability"])
        for rank, index in enumerate(order, start=1):
            predicted = int(np.argmax(probs[index])) if probs is not None else ""
            probability = f"{float(np.max(probs[index])):.4f}" if probs is not None else ""
            writer.writerow([rank, names[index], f"{float(scores[index]):.6f}", predicted, probability])


def predict(local: LocalModel, images: np.ndarray) -> np.ndarray:
    """Calibrated class probabilities of the images."""
    return predict_proba(local.model, images, temperature=local.temperature)

