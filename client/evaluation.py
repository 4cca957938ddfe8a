"""Evaluation at a hospital: the global model on the site's validation split, and the final stages after the
last round (federated temperature scaling, reliability sums, Grad-CAM maps kept at the site).

Everything here returns scalar metrics (or lists of scalar sums); images and maps never leave the hospital.

**Metered evaluation.** Under ``privacy=dp``, or at any hospital whose policy requires DP, nothing computed on the
exact validation data leaves: each evaluate request and each final stage is first admitted under the site's cap
and recorded in its ledger (:func:`~medfed.client.dp_round.charge_release`), then answered with Gaussian-noised
sufficient statistics (:mod:`medfed.common.noised_stats`) from which the coordinator computes the metrics. The
reply's other numbers are data-independent (``num-examples`` 1, the class count, the noise multiplier, the site's
epsilon after the release); no exact count, loss or timing is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from medfed.client.audit import membership_audit
from medfed.client.dp_round import Release, charge_release, metered
from medfed.client.node import NodeEnv, NodeState
from medfed.client.personalization import personalised_metrics
from medfed.client.training import derive_seed, select_device
from medfed.common import keys
from medfed.common.calibration import nll_sums
from medfed.common.config import Config, DPConfig
from medfed.common.data import SiteData
from medfed.common.errors import IncompatibleUpdateError, PolicyRefusal
from medfed.common.explain import gradcam_maps, save_explanations
from medfed.common.inference import predict_logits, predict_proba, softmax
from medfed.common.metrics import ECE_BINS, EPS, classification_metrics, reliability_sums
from medfed.common.models.ssl import ssl_image_losses, ssl_loss
from medfed.common.noised_stats import (
    NLL_CLIP,
    EvalStatistics,
    finite_rows,
    finite_values,
    gaussian_release,
    noise_rng,
)

__all__ = ["DP_CALIBRATION_POINTS", "FinalStage", "dp_grid", "evaluate_round", "final_stage"]

# temperatures a metered calibration answers at most: each adds a per-image NLL to the release's sensitivity
DP_CALIBRATION_POINTS = 9
# a per-image masked-modelling loss counts at most this much in a metered SSL evaluation (mean squared error of
# standardised pixels: a model that predicts the mean scores about 1)
SSL_LOSS_CLIP = 4.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalStage:
    """A final-stage request of the coordinator: ``stage`` (calibrate or reliability) and its parameters, with the
    site's grid and Grad-CAM permission applied (:class:`~medfed.client.policy.SitePolicy`)."""

    stage: str
    temperatures: Sequence[float] = ()
    temperature: float = 1.0
    gradcam: bool = False  # whether the site's policy lets it write Grad-CAM maps (``evaluate.gradcam_samples``)


def _released(release: Release) -> dict[str, float | int]:
    """The data-independent numbers of a metered reply."""
    return {keys.NUM_EXAMPLES: 1, keys.EVAL_NOISE: release.noise_multiplier, keys.EPSILON: release.epsilon_after,
            keys.EPSILON_CHARGED: release.charged, keys.DELTA: release.delta}


def _noised_evaluation(
    cfg: Config, dp: DPConfig, site: SiteData, model: torch.nn.Module, env: NodeEnv, state: NodeState, *,
    run_id: int, server_round: int,
) -> dict[str, float | int]:
    """The validation statistics of the received model, noised and charged to the site's ledger."""
    if cfg.task == "ssl" and cfg.ssl.method != "mim":
        raise PolicyRefusal(f"Under DP this hospital releases an SSL validation loss only as a noised sum of "
                            f"per-image losses; ssl.method={cfg.ssl.method} couples the images of a batch, so it "
                            "does not answer. Use ssl.method=mim, or run SSL without DP at a research site.")
    if cfg.personalize.enabled:
        logger.warning("personalised and fine-tuned validation metrics are not released under DP")
    release = charge_release(cfg, dp, site, env, state, run_id=run_id, server_round=server_round, kind="evaluate")
    if cfg.task == "ssl":  # the image count and the clipped sum of per-image pretext losses (sensitivity sqrt 2)
        losses = finite_values(
            ssl_image_losses(model, site.val.images, seed=derive_seed(cfg.train.seed, "ssl-val", site.site_id)),
            SSL_LOSS_CLIP)  # an overflowing loss counts as the clip, never as NaN
        noised = gaussian_release(np.array([len(losses), np.clip(losses, 0.0, SSL_LOSS_CLIP).sum() / SSL_LOSS_CLIP]),
                                  float(np.sqrt(2.0)), release.noise_multiplier, noise_rng())
        return {keys.NOISED_COUNT: float(noised[0]), keys.NOISED_SSL_LOSS: float(noised[1]) * SSL_LOSS_CLIP,
                **_released(release)}
    probs = (predict_proba(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                           device=select_device(cfg.train.device))
             if len(site.val)
             else np.zeros((0, site.info.n_classes)))  # an empty split releases noise like any other
    stats = EvalStatistics.of(site.val.labels, probs).noised(release.noise_multiplier, noise_rng())
    metrics: dict[str, float | int] = {f"{keys.DP_STAT_PREFIX}{i}": float(v) for i, v in enumerate(stats.vector())}
    metrics[keys.DP_CLASSES] = site.info.n_classes
    metrics.update(_released(release))
    return metrics


def evaluate_round(
    cfg: Config, site: SiteData, model: torch.nn.Module, env: NodeEnv, state: NodeState, server_round: int,
    run_id: int = 0,
) -> dict[str, float | int]:
    """Evaluate the received global model on this hospital's local validation split; with personalisation also
    the hospital's personalised model, and after the last round its locally fine-tuned one. Metered (noised
    statistics only) under DP, see the module's docstring."""
    dp = metered(cfg, env)
    if dp is not None:
        return _noised_evaluation(cfg, dp, site, model, env, state, run_id=run_id, server_round=server_round)
    started = time.perf_counter()
    if cfg.task == "ssl":  # no labels: the pretext loss on the held-out images
        scores = {"loss": ssl_loss(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                                   seed=derive_seed(cfg.train.seed, "ssl-val", site.site_id)), "n": float(len(site.val))}
    else:
        probs = predict_proba(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                              device=select_device(cfg.train.device))
        scores = classification_metrics(site.val.labels, probs)
    metrics: dict[str, float | int] = {f"{keys.EVAL_PREFIX}{k}": float(v) for k, v in scores.items()}
    if cfg.task != "ssl" and site.info.n_classes == 2:  # per-threshold counts: the coordinator's operating point
        exact = EvalStatistics.of(site.val.labels, probs).vector()
        metrics.update({f"{keys.VAL_STAT_PREFIX}{i}": float(v) for i, v in enumerate(exact)})
    if cfg.personalize.enabled:
        metrics.update(personalised_metrics(cfg, site, model, env, state, server_round))
    seconds = time.perf_counter() - started
    metrics.update(
        {keys.NUM_EXAMPLES: len(site.val), keys.EVAL_TIME_S: seconds, keys.N_VAL: len(site.val),
         keys.N_TRAIN: len(site.train)}
    )
    return metrics


def dp_grid(temperatures: Sequence[float]) -> list[float]:
    """At most :data:`DP_CALIBRATION_POINTS` temperatures of a grid, evenly spread over it (1.0 kept when on it)."""
    grid = list(temperatures)
    if len(grid) <= DP_CALIBRATION_POINTS:
        return grid
    picked = {grid[round(i * (len(grid) - 1) / (DP_CALIBRATION_POINTS - 1))] for i in range(DP_CALIBRATION_POINTS)}
    if 1.0 in grid and 1.0 not in picked:  # swap the point nearest 1.0 for it
        picked.remove(min(picked, key=lambda t: abs(np.log(t))))
        picked.add(1.0)
    return sorted(picked)


def _unknown_stage(stage: str) -> IncompatibleUpdateError:
    return IncompatibleUpdateError(
        f"Unknown final stage {stage!r}; this hospital knows {keys.STAGE_CALIBRATE!r}, {keys.STAGE_AUDIT!r} and "
        f"{keys.STAGE_RELIABILITY!r} (is the coordinator running another medfed version?)."
    )


def _noised_final_stage(
    cfg: Config, dp: DPConfig, site: SiteData, model: torch.nn.Module, request: FinalStage, env: NodeEnv,
    state: NodeState, run_id: int,
) -> dict[str, float | int | list[float]]:
    """A final stage's sums, noised and charged: ``calibrate`` the image count and the clipped NLL sum at each
    temperature of a grid of at most :data:`DP_CALIBRATION_POINTS` (sensitivity sqrt(1 + points), the NLL
    scaled by :data:`NLL_CLIP`); ``reliability`` the sums before and after (sensitivity sqrt(6): per image a
    count, a confidence and a correct prediction, twice). No Grad-CAM count is sent."""
    if request.stage not in (keys.STAGE_CALIBRATE, keys.STAGE_RELIABILITY):  # before anything is charged
        raise _unknown_stage(request.stage)
    release = charge_release(cfg, dp, site, env, state, run_id=run_id, server_round=cfg.train.rounds + 1,
                             kind=request.stage)
    n_classes = site.info.n_classes
    logits = (predict_logits(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                             device=select_device(cfg.train.device))
              if len(site.val) else np.zeros((0, n_classes)))
    labels = np.asarray(site.val.labels).reshape(-1).astype(np.int64)
    rng = noise_rng()
    metrics: dict[str, float | int | list[float]] = dict(_released(release))
    if request.stage == keys.STAGE_CALIBRATE:
        grid = dp_grid(request.temperatures)
        rows = np.arange(len(labels))
        per_t = [np.minimum(-np.log(np.clip(finite_rows(softmax(logits, t))[rows, labels], EPS, 1.0)),
                            NLL_CLIP).sum() / NLL_CLIP for t in grid]
        noised = gaussian_release(np.array([len(labels), *per_t]), float(np.sqrt(1 + len(grid))),
                                  release.noise_multiplier, rng)
        metrics[keys.NOISED_COUNT] = float(noised[0])
        metrics[keys.NLL_SUMS] = [float(v) * NLL_CLIP for v in noised[1:]]
        metrics[keys.TEMPERATURES] = [float(t) for t in grid]
        return metrics
    sums = [reliability_sums(labels, finite_rows(softmax(logits, t))) if len(labels) else np.zeros((3, ECE_BINS))
            for t in (1.0, request.temperature)]
    noised = gaussian_release(np.stack(sums), float(np.sqrt(6.0)), release.noise_multiplier, rng)
    metrics[keys.NOISED_COUNT] = float(noised[0, 0].sum())
    metrics[keys.RELIABILITY_BEFORE] = [float(v) for v in noised[0].reshape(-1)]
    metrics[keys.RELIABILITY_AFTER] = [float(v) for v in noised[1].reshape(-1)]
    if cfg.evaluate.gradcam_samples > 0 and request.gradcam:  # kept at the site; not even their count is sent
        _save_gradcam(cfg, site, model, env, run_id, request.temperature)
    return metrics


def final_stage(
    cfg: Config, site: SiteData, model: torch.nn.Module, request: FinalStage, env: NodeEnv, run_id: int,
    state: NodeState | None = None,
) -> dict[str, float | int | list[float]]:
    """After the last round: the scalars of federated temperature scaling on this hospital's validation split.

    ``calibrate``: the summed NLL at each temperature of the grid. ``reliability``: the reliability sums (per
    confidence bin: images, summed confidence, correct predictions) before and after the fitted temperature, and,
    with ``evaluate.gradcam_samples``, Grad-CAM maps of validation images written to this hospital's own disk
    (only their count is sent).
    """
    if request.stage == keys.STAGE_AUDIT:  # outside DP's guarantee (aggregates only), never charged: see audit.py
        audit = membership_audit(cfg, site, model, shadows=cfg.evaluate.audit_shadows)
        return {**audit, keys.NUM_EXAMPLES: 1}  # no timing: it would grow with the site's image count
    dp = metered(cfg, env)
    if dp is not None:
        if state is None:
            raise ValueError("a metered final stage needs the node's state (its ledger mirror)")
        return _noised_final_stage(cfg, dp, site, model, request, env, state, run_id)
    started = time.perf_counter()
    if len(site.val) == 0:  # nothing to calibrate on: the coordinator counts this hospital out
        return {keys.NUM_EXAMPLES: 0, keys.N_VAL: 0, keys.EVAL_TIME_S: 0.0}
    logits = predict_logits(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                            device=select_device(cfg.train.device))
    labels = site.val.labels
    metrics: dict[str, float | int | list[float]] = {keys.NUM_EXAMPLES: len(site.val), keys.N_VAL: len(site.val)}
    if request.stage == keys.STAGE_CALIBRATE:
        metrics[keys.NLL_SUMS] = [float(v) for v in nll_sums(logits, labels, list(request.temperatures))]
        metrics[keys.TEMPERATURES] = [float(t) for t in request.temperatures]
    elif request.stage == keys.STAGE_RELIABILITY:
        for key, t in ((keys.RELIABILITY_BEFORE, 1.0), (keys.RELIABILITY_AFTER, request.temperature)):
            metrics[key] = [float(v) for v in reliability_sums(labels, softmax(logits, t)).reshape(-1)]
        if cfg.evaluate.gradcam_samples > 0:  # 0 saved where the site's policy does not answer gradcam
            saved = _save_gradcam(cfg, site, model, env, run_id, request.temperature) if request.gradcam else 0
            metrics[keys.GRADCAM_SAVED] = saved
    else:
        raise _unknown_stage(request.stage)
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
    maps = gradcam_maps(model, images, device=select_device(cfg.train.device))
    probs = predict_proba(model, images, device=select_device(cfg.train.device), temperature=temperature)
    out_dir = env.explanations_dir(site.site_id, run_id)
    save_explanations(out_dir, images, maps, [f"val-{int(i):05d}" for i in chosen], probs)
    logger.info("saved %d Grad-CAM maps in %s", count, out_dir)
    return count
