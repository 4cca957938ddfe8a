"""Evaluation at a hospital: the global model on the site's validation split, and the final stages after the
last round (federated temperature scaling, reliability sums, Grad-CAM maps kept at the site).

Everything here returns scalar metrics (or lists of scalar sums); images and maps never leave the hospital.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medfed.client.node import NodeEnv, NodeState
from medfed.client.personalization import personalised_metrics
from medfed.client.training import derive_seed, select_device
from medfed.common import keys
from medfed.common.calibration import nll_sums
from medfed.common.config import Config
from medfed.common.data import SiteData
from medfed.common.errors import IncompatibleUpdateError
from medfed.common.explain import gradcam_maps, save_explanations
from medfed.common.inference import evaluate, predict_logits, predict_proba, softmax
from medfed.common.metrics import reliability_sums
from medfed.common.models.ssl import ssl_loss

__all__ = ["FinalStage", "evaluate_round", "final_stage"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalStage:
    """A final-stage request of the coordinator: ``stage`` (calibrate or reliability) and its parameters, with the
    site's grid and Grad-CAM permission applied (:class:`~medfed.client.policy.SitePolicy`)."""

    stage: str
    temperatures: Sequence[float] = ()
    temperature: float = 1.0
    gradcam: bool = False  # whether the site's policy lets it write Grad-CAM maps (``evaluate.gradcam_samples``)


def evaluate_round(
    cfg: Config, site: SiteData, model: torch.nn.Module, env: NodeEnv, state: NodeState, server_round: int
) -> dict[str, float | int]:
    """Evaluate the received global model on this hospital's local validation split; with personalisation also
    the hospital's personalised model, and after the last round its locally fine-tuned one."""
    started = time.perf_counter()
    if cfg.task == "ssl":  # no labels: the pretext loss on the held-out images
        scores = {"loss": ssl_loss(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                                   seed=derive_seed(cfg.train.seed, "ssl-val", site.site_id)), "n": float(len(site.val))}
    else:
        scores = evaluate(
            model, site.val.images, site.val.labels, batch_size=cfg.train.eval_batch_size, device=select_device()
        )
    metrics: dict[str, float | int] = {f"{keys.EVAL_PREFIX}{k}": float(v) for k, v in scores.items()}
    if cfg.personalize.enabled:
        metrics.update(personalised_metrics(cfg, site, model, env, state, server_round))
    seconds = time.perf_counter() - started
    metrics.update(
        {keys.NUM_EXAMPLES: len(site.val), keys.EVAL_TIME_S: seconds, keys.N_VAL: len(site.val),
         keys.N_TRAIN: len(site.train)}
    )
    return metrics


def final_stage(
    cfg: Config, site: SiteData, model: torch.nn.Module, request: FinalStage, env: NodeEnv, run_id: int
) -> dict[str, float | int | list[float]]:
    """After the last round: the scalars of federated temperature scaling on this hospital's validation split.

    ``calibrate``: the summed NLL at each temperature of the grid. ``reliability``: the reliability sums (per
    confidence bin: images, summed confidence, correct predictions) before and after the fitted temperature, and,
    with ``evaluate.gradcam_samples``, Grad-CAM maps of validation images written to this hospital's own disk
    (only their count is sent).
    """
    started = time.perf_counter()
    if len(site.val) == 0:  # nothing to calibrate on: the coordinator counts this hospital out
        return {keys.NUM_EXAMPLES: 0, keys.N_VAL: 0, keys.EVAL_TIME_S: 0.0}
    logits = predict_logits(model, site.val.images, batch_size=cfg.train.eval_batch_size, device=select_device())
    labels = site.val.labels
    metrics: dict[str, float | int | list[float]] = {keys.NUM_EXAMPLES: len(site.val), keys.N_VAL: len(site.val)}
    if request.stage == keys.STAGE_CALIBRATE:
        metrics[keys.NLL_SUMS] = [float(v) for v in nll_sums(logits, labels, list(request.temperatures))]
    elif request.stage == keys.STAGE_RELIABILITY:
        for key, t in ((keys.RELIABILITY_BEFORE, 1.0), (keys.RELIABILITY_AFTER, request.temperature)):
            metrics[key] = [float(v) for v in reliability_sums(labels, softmax(logits, t)).reshape(-1)]
        if cfg.evaluate.gradcam_samples > 0:  # 0 saved where the site's policy does not answer gradcam
            saved = _save_gradcam(cfg, site, model, env, run_id, request.temperature) if request.gradcam else 0
            metrics[keys.GRADCAM_SAVED] = saved
    else:
        raise IncompatibleUpdateError(
            f"Unknown final stage {request.stage!r}; this hospital knows {keys.STAGE_CALIBRATE!r} and "
            f"{keys.STAGE_RELIABILITY!r} (is the coordinator running another medfed version?)."
        )
    metrics[keys.EVAL_TIME_S] = time.perf_counter() - started
    return metrics


def _save_gradcam(cfg: Config, site: SiteData, model: torch.nn.Module, env: NodeEnv, run_id: int,
                  temperature: float) -> int:
    """Grad-CAM maps of a seeded sample of validation images, saved at this hospital; returns how many."""
    count = min(cfg.evaluate.gradcam_samples, len(site.val))
    if count == 0:
        return 0
    rng = np.random.default_rng(derive_seed(cfg.train.seed, "gradcam", site.site_id))
    chosen = np.sort(rng.choice(len(site.val), size=count, replace=False))
    images = site.val.images[chosen]
    maps = gradcam_maps(model, images, device=select_device())
    probs = predict_proba(model, images, device=select_device(), temperature=temperature)
    out_dir = env.explanations_dir(site.site_id, run_id)
    save_explanations(out_dir, images, maps, [f"val-{int(i):05d}" for i in chosen], probs)
    logger.info("saved %d Grad-CAM maps in %s", count, out_dir)
    return count
