"""An empirical privacy audit at a hospital: membership inference against the final model, on the site's own data.

After the last round, a hospital that allows the ``audit`` stage attacks the model the federation selected. Its
members are its training images, its non-members its held-out validation images (never trained on). Two attacks:

- **loss threshold** (always): the lower an image's loss under the model, the more it looks like a member
  (Yeom et al. 2018). The score is the negative cross-entropy of the true class.
- **offline LiRA** (``evaluate.audit_shadows`` = N > 0; Carlini et al., "Membership Inference Attacks From First
  Principles", S&P 2022): the site trains N shadow models of the same recipe on random halves of its own images
  (train and held-out together), so that each image is left out of about half of them. For each image the logit of
  its true-class confidence under the OUT shadows gives the spread it has when not trained on; the score is how far
  the final model's logit lies above that (a z-score with the OUT mean per image and the variance pooled over
  images, the offline test of the paper for few shadows).

Only aggregates leave: per attack the AUC (members vs non-members) and the true-positive rate at 1 % and 0.1 %
false-positive rate (with fewer non-members than 1 / FPR, the rate at the strictest threshold any non-member allows,
i.e. at zero false positives). No score, count or image leaves. These numbers are *not* covered by DP-SGD's
guarantee: the audit computes on the exact data (its shadows train without DP), so a hospital runs it only when its
site config lists the ``audit`` stage (simulated hospitals do), and never charges it to its ledger.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import torch
from medfed.client.training import derive_seed, select_device, train_epochs
from medfed.common import keys
from medfed.common.config import Config
from medfed.common.data import ArrayDataset, SiteData
from medfed.common.inference import predict_logits
from medfed.common.metrics import roc_auc

__all__ = ["AUDIT_FPRS", "attack_metrics", "membership_audit", "true_class_logit"]

logger = logging.getLogger(__name__)

AUDIT_FPRS = (0.01, 0.001)
_MAX_SHADOW_EPOCHS = 50


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC of telling members (higher score) from non-members, and the TPR at each false-positive rate of
    :data:`AUDIT_FPRS` (the threshold: the non-member score quantile; at most the largest non-member score)."""
    members, others = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        return {"auc": float("nan"), **{f"tpr_at_{fpr:g}": float("nan") for fpr in AUDIT_FPRS}}
    labels = np.concatenate([np.ones(members.size, bool), np.zeros(others.size, bool)])
    out = {"auc": roc_auc(labels, np.concatenate([members, others]))}
    ordered = np.sort(others)
    for fpr in AUDIT_FPRS:
        allowed = int(np.floor(fpr * others.size))  # non-members the threshold may let through
        threshold = ordered[others.size - 1 - allowed]
        out[f"tpr_at_{fpr:g}"] = float(np.mean(members > threshold))
    return out


def true_class_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` of each image's true class (LiRA's scaling of the confidence), computed stably."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    rest = np.log(np.exp(others - others.max(axis=1, keepdims=True)).sum(axis=1)) + others.max(axis=1)
    return true - rest


def _loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative cross-entropy of the true class (higher: more member-like)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return log_probs[np.arange(len(labels)), labels]


def membership_audit(cfg: Config, site: SiteData, model: torch.nn.Module, *, shadows: int) -> dict[str, float]:
    """The audit's reply: per attack its AUC and TPRs (``audit-loss-auc``, ``audit-lira-tpr_at_0.01`` ...)."""
    members, others = site.train, site.val
    device = select_device(cfg.train.device)
    pool = ArrayDataset.concat([members, others])  # (a folder site's images stay on its disk)
    is_member = np.concatenate([np.ones(len(members), bool), np.zeros(len(others), bool)])
    logits = predict_logits(model, pool.images, batch_size=cfg.train.eval_batch_size, device=device)
    loss = _loss_scores(logits, pool.labels)
    out = {f"{keys.AUDIT_PREFIX}loss-{k}": v for k, v in attack_metrics(loss[is_member], loss[~is_member]).items()}
    if shadows > 0 and len(pool) >= 4:
        lira = _offline_lira(cfg, site, model, pool, true_class_logit(logits, pool.labels), shadows)
        out.update({f"{keys.AUDIT_PREFIX}lira-{k}": v
                    for k, v in attack_metrics(lira[is_member], lira[~is_member]).items()})
    return out


def _offline_lira(cfg: Config, site: SiteData, model: torch.nn.Module, pool: ArrayDataset, target: np.ndarray,
                  shadows: int) -> np.ndarray:
    """Offline LiRA scores of every pool image (see the module docstring)."""
    rng = np.random.default_rng(derive_seed(cfg.train.seed, "audit", site.site_id))
    recipe = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, max(1, len(pool) // 2)))
    # the run's epochs, or its steps (as many as one hospital trained in the run), within the same cap
    epochs, steps = min(_MAX_SHADOW_EPOCHS, max(1, cfg.train.rounds * cfg.train.local_epochs)), 0
    if not cfg.train.local_epochs:
        per_epoch = -(-max(1, len(pool) // 2) // recipe.batch_size)
        epochs, steps = 0, min(_MAX_SHADOW_EPOCHS * per_epoch, cfg.train.rounds * cfg.train.local_steps)
    out_logits: list[list[float]] = [[] for _ in range(len(pool))]
    for k in range(shadows):
        inside = rng.random(len(pool)) < 0.5
        if inside.sum() < 1 or (~inside).sum() < 1:
            continue
        shadow = copy.deepcopy(model)
        torch.manual_seed(derive_seed(cfg.train.seed, "shadow", site.site_id, k))
        for module in shadow.modules():  # a fresh start of what trains (a frozen encoder stays as it is)
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and any(p.requires_grad for p in module.parameters(recurse=False)):
                reset()
        train_epochs(shadow, pool.subset(np.flatnonzero(inside)), recipe, epochs=epochs, steps=steps,
                     n_classes=site.info.n_classes, spatial_dims=site.info.spatial_dims,
                     seed=derive_seed(cfg.train.seed, "shadow-train", site.site_id, k),
                     device=select_device(cfg.train.device))
        shadow.eval()
        outside = pool.subset(np.flatnonzero(~inside)).images
        phi = true_class_logit(predict_logits(shadow, outside, batch_size=cfg.train.eval_batch_size,
                                              device=select_device(cfg.train.device)), pool.labels[~inside])
        for index, value in zip(np.flatnonzero(~inside), phi, strict=True):
            out_logits[int(index)].append(float(value))
    means = np.array([np.mean(v) if v else np.nan for v in out_logits])
    spread = np.concatenate([np.asarray(v) - np.mean(v) for v in out_logits if len(v) >= 2] or [np.zeros(0)])
    sigma = float(np.std(spread)) if spread.size >= 2 else 1.0
    fallback = float(np.nanmean(means)) if np.isfinite(means).any() else 0.0
    means = np.where(np.isfinite(means), means, fallback)  # an image in every shadow: the mean over images
    logger.info("audit: %d shadow models, pooled OUT spread %.3g", shadows, sigma)
    return (target - means) / max(sigma, 1e-6)
