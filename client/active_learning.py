"""Simulated active learning at one site: does labelling the images the model is least sure of teach it more than
labelling random ones?

A site starts with a few labelled images (stratified) and a pool whose labels are hidden. Each step trains a model
from the same initial weights on the labelled set for a fixed number of epochs, measures it on a test set (only to
report: nothing is selected on it), scores the pool (:func:`client.local_tools`' methods: entropy, margin, random)
and reveals the labels of the top ``per_step`` images. Both methods start from the same labelled set and seeds, so
their curves differ only by which images were chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from medfed.client.training import train_epochs
from medfed.common.config import ModelConfig, TrainConfig
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError
from medfed.common.inference import predict_proba
from medfed.common.metrics import classification_metrics
from medfed.common.models import build_model
from medfed.common.uncertainty import labelling_scores, rank_for_labelling

__all__ = ["Learner", "active_learning_curve", "cnn_learner", "stratified_start"]

logger = logging.getLogger(__name__)


def stratified_start(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices with every class represented as evenly as the data allows (seeded).

    Raises:
        ConfigError: ``count`` smaller than the number of classes present or larger than the data.
    """
    classes = np.unique(labels)
    if not classes.size <= count <= labels.size:
        raise ConfigError(f"initial={count} labelled images must lie in [{classes.size} (one per class), "
                          f"{labels.size} (the site's images)].")
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    chosen: list[int] = []
    while len(chosen) < count:
        for c in classes:
            if per_class[c] and len(chosen) < count:
                chosen.append(per_class[c].pop())
    return np.sort(np.asarray(chosen, dtype=np.int64))


# given the labelled indices: a function giving class probabilities of any site indices, and the test metrics
Learner = Callable[[np.ndarray], tuple[Callable[[np.ndarray], np.ndarray], dict[str, float]]]


def active_learning_curve(
    labels: np.ndarray,
    learner: Learner,
    *,
    method: str,
    initial: int,
    per_step: int,
    steps: int,
    seed: int,
) -> list[dict[str, float]]:
    """The learning curve of one site under ``method``: per step the labelled count and the learner's metrics.

    Starts from :func:`stratified_start`; each step trains (``learner``), scores the unlabelled pool and reveals
    the labels of its ``per_step`` highest-scoring images.
    """
    if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
        raise ConfigError(f"per_step={per_step!r} is out of range; it must be an int >= 1.")
    labelled = stratified_start(labels, initial, seed)
    pool = np.setdiff1d(np.arange(labels.size), labelled)
    rng = np.random.default_rng(seed + 1)
    curve: list[dict[str, float]] = []
    for step in range(steps + 1):
        predict, metrics = learner(labelled)
        curve.append({"step": step, "labelled": int(labelled.size), **metrics})
        if step == steps or pool.size == 0:
            break
        chosen = pool[rank_for_labelling(labelling_scores(method, predict(pool), rng))[:per_step]]
        labelled = np.sort(np.concatenate([labelled, chosen]))
        pool = np.setdiff1d(pool, chosen)
    return curve


def cnn_learner(
    site: ArrayDataset,
    test: ArrayDataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    n_classes: int,
    spatial_dims: int,
    epochs: int,
    seed: int,
) -> Learner:
    """The site's model trained from the same initial weights for ``epochs`` on the labelled images (batches of at
    most 32); metrics on ``test`` (reported only: nothing is selected on it)."""
    cfg = replace(train_cfg, batch_size=min(train_cfg.batch_size, 32))

    def learn(labelled: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, float]]:
        torch.manual_seed(seed)  # the same initial weights at every step and for every method
        model = build_model(model_cfg, spatial_dims=spatial_dims, in_channels=site.images.shape[1],
                            n_classes=n_classes)
        train_epochs(model, site.subset(labelled), cfg, epochs=epochs,
                     n_classes=n_classes, spatial_dims=spatial_dims, seed=seed, device=torch.device("cpu"))
        metrics = classification_metrics(test.labels, predict_proba(model, test.images))
        return (lambda indices: predict_proba(model, site.subset(indices).images)), {"auc": metrics["auc"],
                                                                                    "acc": metrics["acc"]}

    return learn
