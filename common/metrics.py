"""Classification metrics of medfed, in numpy only: ROC AUC, accuracy, balanced accuracy, F1, loss, and for
binary tasks sensitivity, specificity and precision.

Every function returns plain Python floats. A metric that is undefined on the given data (AUC with one class
present, sensitivity without positives, ...) is ``nan``, never an exception: with label skew a hospital's
validation split can hold a single class. :func:`finite_or_none` turns ``nan``/``inf`` into ``None`` for JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "ECE_BINS",
    "EPS",
    "classification_metrics",
    "ece_from_sums",
    "expected_calibration_error",
    "finite_or_none",
    "metrics_at_threshold",
    "reliability_bins",
    "reliability_from_sums",
    "reliability_sums",
    "roc_auc",
    "roc_curve",
    "selection_key",
]

logger = logging.getLogger(__name__)

EPS = 1e-12
NAN = float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the average of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    average = ends - (counts - 1) / 2.0
    return average[inverse.reshape(-1)]


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC by ranks (Mann-Whitney U with average ranks for ties, so a tie counts 1/2).

    Args:
        y_true: ``(N,)`` labels in {0, 1} (or bool); 1 is the positive class.
        scores: ``(N,)`` finite scores, higher meaning more likely positive.

    Returns:
        The AUC, or ``nan`` when only one class is present.

    Raises:
        ValueError: empty input, length mismatch, labels outside {0, 1} or non-finite scores.
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("roc_auc: y_true is empty; AUC needs at least one positive and one negative sample.")
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: y_true has {y.size} entries but scores has {s.size}; they must match.")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
        raise ValueError(f"roc_auc: y_true must hold only 0 and 1 (binary labels); got values {bad}.")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores contain nan or inf; pass finite scores.")
    positive = y.astype(bool)
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = _average_ranks(s)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST labels come as (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true must have shape (N,) (or (N, 1)); got shape {y.shape}.")
    if y.size == 0:
        raise ValueError("Cannot compute metrics on an empty set: y_true has no samples.")
    if p.ndim != 2 or p.shape[0] != y.size or p.shape[1] < 2:
        raise ValueError(
            f"probs must have shape (N, C) with N={y.size} samples and C >= 2 classes; got shape {p.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"y_true must hold integer class indices; got dtype {y.dtype} with fractions.")
    y = y.astype(np.int64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"y_true holds labels in [{int(y.min())}, {int(y.max())}] but probs has {n_classes} classes; "
            f"labels must lie in [0, {n_classes - 1}]."
        )
    if not np.isfinite(p).all():
        raise ValueError("probs contain nan or inf; pass finite class probabilities (softmax outputs).")
    return y, p


ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017)


def reliability_sums(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Reliability sums ``(3, bins)``: per equal-width bin of the top-class confidence (right-closed, the first
    also holding 0) the number of images, the sum of their confidences and the number predicted correctly.

    Sums add up over hospitals, so the federation's pooled reliability data and ECE come from the sites' sums
    (:func:`reliability_from_sums`) without any image leaving a site.
    """
    y, p = _check_inputs(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    sums = np.zeros((3, bins), dtype=np.float64)
    np.add.at(sums[0], index, 1.0)
    np.add.at(sums[1], index, confidence)
    np.add.at(sums[2], index, correct)
    return sums


def reliability_from_sums(sums: np.ndarray) -> list[dict[str, float]]:
    """The reliability table of :func:`reliability_sums` output: per bin its edges, count, mean confidence and
    accuracy (empty bins: nan)."""
    table = np.asarray(sums, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != 3 or table.shape[1] < 1:
        raise ValueError(f"reliability sums must have shape (3, bins); got shape {table.shape}.")
    bins = table.shape[1]
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for b in range(bins):
        count = float(table[0, b])
        out.append({
            "low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
            # means of values in [0, 1]: within it (noised sums, metered DP, can stray outside)
            "confidence": float(np.clip(table[1, b] / count, 0.0, 1.0)) if count > 0 else NAN,
            "accuracy": float(np.clip(table[2, b] / count, 0.0, 1.0)) if count > 0 else NAN,
        })
    return out


def ece_from_sums(sums: np.ndarray) -> float:
    """ECE of reliability sums: the count-weighted mean over bins of |accuracy - mean confidence| (nan: no image)."""
    table = np.asarray(sums, dtype=np.float64)
    n = float(table[0].sum())
    if n <= 0:
        return NAN
    return float(np.abs(table[2] - table[1]).sum() / n)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Reliability data: for each of ``bins`` equal-width bins of the top-class confidence (right-closed, the
    first also holding 0), the images in it, their mean confidence and their accuracy (empty bins: nan)."""
    return reliability_from_sums(reliability_sums(y_true, probs, bins))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean over confidence bins of |accuracy - mean confidence| (top-class)."""
    return ece_from_sums(reliability_sums(y_true, probs, bins))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1).

    Raises:
        ValueError: length mismatch, or fewer than two classes in ``y_true``.
    """
    y = np.asarray(y_true).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"roc_curve: y_true has {y.size} entries but scores has {s.size}; they must match.")
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("roc_curve needs both classes in y_true; this set holds only one.")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else NAN


def metrics_at_threshold(y_true: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Binary decisions at ``threshold`` on the probability of class 1 (class 1 when ``p >= threshold``):
    ``threshold``, ``acc``, ``bal_acc``, ``sensitivity``, ``specificity``, ``precision``, ``f1`` (of class 1) and
    ``n``; ``nan`` where a rate is undefined.

    Raises:
        ValueError: not binary probabilities, empty input or inconsistent shapes.
    """
    y, p = _check_inputs(y_true, probs)
    if p.shape[1] != 2:
        raise ValueError(f"metrics_at_threshold() needs binary probabilities (N, 2); got {p.shape[1]} classes.")
    predicted = p[:, 1] >= threshold
    positive = y == 1
    tp, fn = float(np.sum(predicted & positive)), float(np.sum(~predicted & positive))
    tn, fp = float(np.sum(~predicted & ~positive)), float(np.sum(predicted & ~positive))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else NAN

    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    recalls = [r for r in (sensitivity, specificity) if not math.isnan(r)]
    return {
        "threshold": float(threshold), "n": float(len(y)), "acc": ratio(tp + tn, len(y)),
        "bal_acc": float(np.mean(recalls)) if recalls else NAN, "sensitivity": sensitivity,
        "specificity": specificity, "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics of class probabilities against integer labels.

    Args:
        y_true: ``(N,)`` (or ``(N, 1)``) integer labels in ``[0, C)``.
        probs: ``(N, C)`` class probabilities (rows summing to 1, e.g. softmax outputs); prediction = argmax.

    Returns:
        ``auc`` (binary: AUC of class 1; multi-class: macro one-vs-rest mean over the classes present, as
        MedMNIST reports; ``nan`` when fewer than two classes are present), ``acc``, ``bal_acc`` (mean recall over
        classes present in ``y_true``), ``f1`` (macro over classes present in ``y_true`` or predicted), ``n``,
        ``loss`` (mean cross-entropy of the true class, probabilities clipped at 1e-12), ``ece`` (expected
        calibration error over 15 confidence bins, :func:`expected_calibration_error`), and for ``C == 2`` also
        ``sensitivity``, ``specificity`` and ``precision`` of class 1 (``nan`` when undefined). All Python floats.

    Raises:
        ValueError: empty input or inconsistent shapes / labels.
    """
    y, p = _check_inputs(y_true, probs)
    n, n_classes = p.shape
    pred = p.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)  # rows: truth, columns: prediction
    np.add.at(confusion, (y, pred), 1)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    tp = np.diag(confusion)

    present = np.flatnonzero(true_counts > 0)
    union = np.flatnonzero((true_counts > 0) | (pred_counts > 0))
    recall = tp[present] / true_counts[present]
    f1 = 2 * tp[union] / (true_counts[union] + pred_counts[union])

    if n_classes == 2:
        auc = roc_auc(y == 1, p[:, 1])
    elif present.size < 2:
        auc = NAN
    else:
        auc = float(np.mean([roc_auc(y == c, p[:, c]) for c in present]))

    true_prob = np.clip(p[np.arange(n), y], EPS, 1.0)
    metrics: dict[str, float] = {
        "auc": float(auc),
        "acc": float(tp.sum() / n),
        "bal_acc": float(recall.mean()),
        "f1": float(f1.mean()),
        "n": float(n),
        "loss": float(-np.log(true_prob).mean()),
        "ece": expected_calibration_error(y, p),
    }
    if n_classes == 2:
        tn, fp, fn, tp1 = (int(v) for v in confusion.reshape(-1))
        metrics["sensitivity"] = _ratio(tp1, tp1 + fn)
        metrics["specificity"] = _ratio(tn, tn + fp)
        metrics["precision"] = _ratio(tp1, tp1 + fp)
    return metrics


def finite_or_none(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Copy of ``metrics`` with ``nan``/``inf`` replaced by ``None`` (JSON has no nan), values as Python floats."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        number = float(value)
        out[key] = number if math.isfinite(number) else None
    return out


def selection_key(val: Mapping[str, float]) -> tuple[int, float, float, float]:
    """Order rounds for model selection: any defined AUC beats none; then the higher AUC; on a tie the higher
    balanced accuracy (so a model that says one class never wins over one that ranks as well and separates the
    classes), then the lower loss. Without an AUC: the lower loss. Callers let the later round win a full tie."""

    def number(key: str, sign: float) -> float:
        value = val.get(key, math.nan)
        return sign * float(value) if value is not None and math.isfinite(value) else -math.inf

    auc = val.get("auc", math.nan)
    if auc is not None and math.isfinite(auc):
        return (1, float(auc), number("bal_acc", 1.0), number("loss", -1.0))
    return (0, number("loss", -1.0), -math.inf, -math.inf)
