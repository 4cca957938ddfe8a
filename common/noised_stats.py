"""Validation metrics released with differential privacy: a hospital sends noised sufficient statistics, the
coordinator computes the metrics from them (and from their sums over hospitals).

A hospital under DP never sends a metric computed on its exact validation data. It sums, over its validation
images, one bounded vector per image (:meth:`EvalStatistics.of`):

- **score histograms**: per scored class ``k`` (binary: class 1 only; multi-class: every class, one-vs-rest), the
  counts of images whose predicted probability of ``k`` falls in each of :data:`SCORE_BINS` equal-width bins,
  split by whether the image's label is ``k``: its confusion counts at every threshold ``b / SCORE_BINS``;
- multi-class only: the **confusion matrix** (truth x prediction) and the **reliability sums** (per top-class
  confidence bin: images, summed confidence, correct predictions);
- the **clipped NLL sum**: each image's cross-entropy clipped to ``[0, NLL_CLIP]``.

One image changes the vector by at most :meth:`EvalStatistics.sensitivity` in L2 norm (adding or removing it), so
Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` makes the release a Gaussian mechanism:
Renyi-DP ``alpha / (2 noise_multiplier^2)`` at every order, which the hospital's ledger composes with its DP-SGD
rounds as one step at sampling rate 1 (:mod:`medfed.client.privacy`). Every metric below is post-processing of the
noised vector, so it costs nothing more: AUC from the histograms (ties within a bin count one half), accuracy,
sensitivity, specificity, precision, F1 and balanced accuracy from the counts at the 0.5 threshold (binary) or the
confusion matrix, ECE from the histograms (binary, at bin centres) or the reliability sums, loss from the NLL sum.
A row of non-finite probabilities (a crafted model can overflow) counts as the uniform distribution
(:func:`finite_rows`), so it moves the sums no more than any image and no NaN passes the noise.
Noised counts are used as they are (a negative count is noise; clipping each at zero would bias every sum upward);
only totals are read as at least zero and rates as within [0, 1].

The same Gaussian release serves the final calibration stages (:func:`gaussian_release`): a vector of per-image
bounded sums with its L2 sensitivity.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.common.metrics import ECE_BINS, EPS, ece_from_sums, reliability_sums

__all__ = [
    "NLL_CLIP",
    "auc_noise_se",
    "finite_rows",
    "finite_values",
    "SCORE_BINS",
    "EvalStatistics",
    "gaussian_release",
    "noise_rng",
    "pooled",
    "statistics_from_metrics",
]

SCORE_BINS = 20  # even, so that 0.5 (the binary decision threshold) is a bin edge
NLL_CLIP = math.log(100.0)  # a per-image cross-entropy counts at most this much (probability 1 % of the truth)
NAN = float("nan")


def noise_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy: the noise never follows the run's seed, which the
    coordinator chooses (a coordinator that could predict the noise could subtract it)."""
    return np.random.default_rng(secrets.randbits(128))


def finite_rows(probs: np.ndarray) -> np.ndarray:
    """Class probabilities with every row that holds a non-finite value (a model whose outputs overflow, as a
    coordinator can craft) replaced by the uniform distribution: what such an image adds to a noised sum is then
    as bounded as any other's, and no NaN passes the noise as an exact signal."""
    p = np.array(probs, dtype=np.float64, copy=True)
    if p.ndim == 2 and p.shape[1] > 0:
        bad = ~np.isfinite(p).all(axis=1)
        p[bad] = 1.0 / p.shape[1]
    return p


def finite_values(values: np.ndarray, bad: float) -> np.ndarray:
    """``values`` with every non-finite entry replaced by ``bad`` (a data-independent constant)."""
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, bad)


def gaussian_release(
    values: np.ndarray, sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """``values`` plus Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` in each entry."""
    if not noise_multiplier > 0 or not sensitivity > 0:
        raise ValueError(f"a Gaussian release needs noise_multiplier > 0 and sensitivity > 0; got "
                         f"{noise_multiplier!r} and {sensitivity!r}.")
    array = np.asarray(values, dtype=np.float64)
    return array + rng.normal(0.0, noise_multiplier * sensitivity, size=array.shape)


def _bins(scores: np.ndarray) -> np.ndarray:
    """The score bin of each probability: ``[b / SCORE_BINS, (b + 1) / SCORE_BINS)``, 1.0 in the last."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64) * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)


def _auc(neg: np.ndarray, pos: np.ndarray, *, clip: bool = True) -> float:
    """AUC of binned scores: a positive beats every negative in a lower bin and half of those in its own. On noised
    counts (left unclipped: independent zero-mean noise keeps every product's expectation) it is clipped to [0, 1]
    unless ``clip`` is false."""
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg <= 0 or n_pos <= 0:
        return NAN
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    raw = float((pos * (below + 0.5 * neg)).sum() / (n_neg * n_pos))
    return float(np.clip(raw, 0.0, 1.0)) if clip else raw


def _raw_auc(statistics: EvalStatistics) -> float:
    """The AUC estimate before clipping (binary: class 1; multi-class: the mean over classes one-vs-rest)."""
    aucs = [_auc(h[0], h[1], clip=False) for h in statistics.histograms]
    return float(np.mean(aucs)) if all(math.isfinite(a) for a in aucs) else NAN


def _balanced_accuracies(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Balanced accuracy of deciding class 1 at each bin edge ``1 .. SCORE_BINS - 1``, per row of (possibly noised)
    histograms ``(R, SCORE_BINS)``; nan in a row whose class counts fall below one image."""
    n_neg, n_pos = neg.sum(axis=1, keepdims=True), pos.sum(axis=1, keepdims=True)
    specificity = np.cumsum(neg, axis=1)[:, :-1]  # images below edge b = bins 0..b-1
    sensitivity = pos.sum(axis=1, keepdims=True) - np.cumsum(pos, axis=1)[:, :-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = (np.clip(specificity / n_neg, 0, 1) + np.clip(sensitivity / n_pos, 0, 1)) / 2
    return np.where((n_neg >= 1) & (n_pos >= 1), rates, np.nan)


def _ratio(numerator: float, denominator: float) -> float:
    """A rate of (possibly noised) counts, within [0, 1]; nan when the denominator is not positive."""
    return float(np.clip(numerator / denominator, 0.0, 1.0)) if denominator > 0 else NAN


@dataclass(frozen=True)
class EvalStatistics:
    """The sufficient statistics of a validation split for medfed's metrics (exact at the hospital, noised once
    they leave it). ``histograms[k, y, b]``: images with label ``== k`` (``y=1``) or not (``y=0``) whose probability
    of the scored class ``k`` falls in bin ``b`` (binary: one scored class, class 1). ``nll``: the clipped NLL sum
    divided by :data:`NLL_CLIP` (so each image adds at most 1)."""

    n_classes: int
    histograms: np.ndarray
    confusion: np.ndarray | None
    reliability: np.ndarray | None
    nll: float

    @staticmethod
    def sensitivity(n_classes: int) -> float:
        """The L2 norm by which one image can change the statistics' vector: one histogram cell per scored class,
        one confusion cell and three reliability entries (each at most 1; multi-class), the scaled NLL (at most 1)."""
        return math.sqrt(1 + 1) if n_classes == 2 else math.sqrt(n_classes + 1 + 3 + 1)

    @staticmethod
    def size(n_classes: int) -> int:
        """The length of the statistics' vector for ``n_classes`` classes."""
        scored = 1 if n_classes == 2 else n_classes
        extra = 0 if n_classes == 2 else n_classes * n_classes + 3 * ECE_BINS
        return scored * 2 * SCORE_BINS + extra + 1

    @classmethod
    def of(cls, labels: np.ndarray, probs: np.ndarray) -> EvalStatistics:
        """The exact statistics of class probabilities ``probs`` ``(N, C)`` against integer ``labels``."""
        p = finite_rows(probs)
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        n, n_classes = p.shape
        scored = [1] if n_classes == 2 else list(range(n_classes))
        histograms = np.zeros((len(scored), 2, SCORE_BINS))
        for row, k in enumerate(scored):
            np.add.at(histograms[row], ((y == k).astype(np.int64), _bins(p[:, k])), 1.0)
        confusion = reliability = None
        if n_classes > 2:
            pred = p.argmax(axis=1)
            confusion = np.zeros((n_classes, n_classes))
            np.add.at(confusion, (y, pred), 1.0)
            reliability = reliability_sums(y, p) if n else np.zeros((3, ECE_BINS))
        nll = -np.log(np.clip(p[np.arange(n), y], EPS, 1.0)) if n else np.zeros(0)
        return cls(n_classes, histograms, confusion, reliability, float(np.minimum(nll, NLL_CLIP).sum() / NLL_CLIP))

    def vector(self) -> np.ndarray:
        parts = [self.histograms.reshape(-1)]
        if self.confusion is not None and self.reliability is not None:
            parts += [self.confusion.reshape(-1), self.reliability.reshape(-1)]
        return np.concatenate([*parts, [self.nll]])

    @classmethod
    def from_vector(cls, n_classes: int, values: Sequence[float] | np.ndarray) -> EvalStatistics:
        """The statistics of a vector of :meth:`vector`'s layout (as the coordinator receives it).

        Raises:
            ValueError: the vector's length is not the layout's for ``n_classes``.
        """
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if n_classes < 2 or v.size != cls.size(n_classes):
            raise ValueError(f"noised statistics of {v.size} values do not fit {n_classes} classes (expected "
                             f"{cls.size(n_classes) if n_classes >= 2 else 'n_classes >= 2'}).")
        scored = 1 if n_classes == 2 else n_classes
        cut = scored * 2 * SCORE_BINS
        histograms = v[:cut].reshape(scored, 2, SCORE_BINS)
        confusion = reliability = None
        if n_classes > 2:
            confusion = v[cut:cut + n_classes * n_classes].reshape(n_classes, n_classes)
            cut += n_classes * n_classes
            reliability = v[cut:cut + 3 * ECE_BINS].reshape(3, ECE_BINS)
        return cls(n_classes, histograms, confusion, reliability, float(v[-1]))

    def noised(self, noise_multiplier: float, rng: np.random.Generator) -> EvalStatistics:
        """These statistics with the Gaussian noise of one release (see the module's docstring)."""
        noisy = gaussian_release(self.vector(), self.sensitivity(self.n_classes), noise_multiplier, rng)
        return self.from_vector(self.n_classes, noisy)

    def __add__(self, other: EvalStatistics) -> EvalStatistics:
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot pool statistics of {self.n_classes} and {other.n_classes} classes.")
        return self.from_vector(self.n_classes, self.vector() + other.vector())

    @property
    def n(self) -> float:
        """Images counted (noised: an unbiased estimate, read as 0 when below)."""
        return float(max(self.histograms[0].sum(), 0.0))

    def threshold(self, noise_std: float = 0.0, *, draws: int = 200) -> float | None:
        """Binary: the operating threshold on the probability of class 1, among the bin edges ``b / SCORE_BINS``,
        with the highest balanced accuracy (mean of sensitivity and specificity) on these counts; ties go to the
        edge nearest 0.5. None for multi-class statistics.

        Noised counts (``noise_std`` > 0, the standard deviation of the noise in each entry): an edge replaces 0.5
        only where its balanced accuracy beats 0.5's by more than one standard error of that difference (a
        parametric bootstrap at the known noise scale, seeded: post-processing, no privacy cost), the rule model
        selection follows; with a class counted below one image, or noise of unknown size (``inf``), 0.5 stays."""
        if self.n_classes != 2:
            return None
        if not math.isfinite(noise_std):  # noise of unknown size: no edge can be shown to beat 0.5
            return 0.5
        neg, pos = self.histograms[0]
        half = SCORE_BINS // 2
        observed = _balanced_accuracies(neg[None], pos[None])[0]
        if not np.isfinite(observed).all():
            return 0.5
        gain = observed - observed[half - 1]
        if noise_std > 0:
            rng = np.random.default_rng(0)
            noised = _balanced_accuracies(neg + rng.normal(0.0, noise_std, (draws, SCORE_BINS)),
                                          pos + rng.normal(0.0, noise_std, (draws, SCORE_BINS)))
            with np.errstate(invalid="ignore"):
                spread = np.nanstd(noised - noised[:, [half - 1]], axis=0)
            usable = np.isfinite(noised).all(axis=1).mean() >= 5 / 6
            gain = np.where(usable & (gain > np.nan_to_num(spread, nan=np.inf)), gain, -np.inf)
            gain[half - 1] = 0.0
        edges = np.arange(1, SCORE_BINS)
        best = max(range(len(edges)), key=lambda i: (gain[i], -abs(edges[i] / SCORE_BINS - 0.5)))
        return float(edges[best] / SCORE_BINS)

    def metrics_at(self, threshold: float) -> dict[str, float]:
        """Binary: sensitivity, specificity and balanced accuracy of deciding class 1 at ``threshold`` (rounded to
        the nearest bin edge) on these counts (rates within [0, 1] even on noised counts)."""
        neg, pos = self.histograms[0]
        edge = round(threshold * SCORE_BINS)
        tn, fp, fn, tp = neg[:edge].sum(), neg[edge:].sum(), pos[:edge].sum(), pos[edge:].sum()
        sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        recalls = [r for r in (sensitivity, specificity) if math.isfinite(r)]
        return {"sensitivity": sensitivity, "specificity": specificity,
                "bal_acc": float(np.mean(recalls)) if recalls else NAN}

    def metrics(self) -> dict[str, float]:
        """The metrics of :func:`medfed.common.metrics.classification_metrics`, from these statistics."""
        n = self.n
        out: dict[str, float] = {"n": n, "loss": max(self.nll, 0.0) * NLL_CLIP / n if n > 0 else NAN}
        if self.n_classes == 2:
            neg, pos = self.histograms[0]
            half = SCORE_BINS // 2
            tn, fp, fn, tp = neg[:half].sum(), neg[half:].sum(), pos[:half].sum(), pos[half:].sum()
            out["auc"] = _auc(neg, pos)
            out["acc"] = _ratio(tp + tn, n)
            out["sensitivity"] = _ratio(tp, tp + fn)
            out["specificity"] = _ratio(tn, tn + fp)
            out["precision"] = _ratio(tp, tp + fp)
            recalls = [r for r in (out["sensitivity"], out["specificity"]) if math.isfinite(r)]
            out["bal_acc"] = float(np.mean(recalls)) if recalls else NAN
            f1s = [_ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)]
            out["f1"] = float(np.mean([f for f in f1s if math.isfinite(f)])) if any(map(math.isfinite, f1s)) else NAN
            centres = (np.arange(SCORE_BINS) + 0.5) / SCORE_BINS
            confidence = np.maximum(centres, 1.0 - centres)
            correct = np.where(centres > 0.5, pos, neg)
            out["ece"] = _ratio(float(np.abs(correct - confidence * (neg + pos)).sum()), n)
            return out
        confusion = self.confusion if self.confusion is not None else np.zeros((self.n_classes, self.n_classes))
        truth, predicted, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
        present = truth > 0.5  # a class counts as present when its noised count rounds to one image or more
        union = present | (predicted > 0.5)
        out["acc"] = _ratio(float(hits.sum()), float(confusion.sum()))
        out["bal_acc"] = float(np.mean(np.clip(hits[present] / truth[present], 0, 1))) if present.any() else NAN
        out["f1"] = (float(np.mean(np.clip(2 * hits[union] / np.maximum(truth[union] + predicted[union], 1.0), 0, 1)))
                     if union.any() else NAN)
        aucs = [_auc(h[0], h[1]) for k, h in enumerate(self.histograms) if present[k]]
        finite = [a for a in aucs if math.isfinite(a)]
        out["auc"] = float(np.mean(finite)) if len(finite) >= 2 else NAN
        reliability = np.clip(self.reliability if self.reliability is not None else 0.0, 0.0, None)
        out["ece"] = ece_from_sums(reliability)
        return out


def auc_noise_se(statistics: EvalStatistics, noise_std: float, *, draws: int = 200) -> float:
    """The standard error that noise of ``noise_std`` per entry puts on the AUC of noised ``statistics``, by a
    parametric bootstrap (more noise of the same scale, ``draws`` times, from a fixed seed: post-processing of
    the released vector and of the data-independent noise scale, so it costs no privacy). Robust: half the spread
    between the 16th and 84th percentiles of the unclipped estimates (clipping at 0 and 1 would hide the noise);
    ``inf`` when the noise leaves a class with no images in more than one draw in six (no AUC to speak of)."""
    if not noise_std > 0:
        return 0.0
    rng = np.random.default_rng(0)
    vector = statistics.vector()
    aucs = np.array([_raw_auc(EvalStatistics.from_vector(statistics.n_classes,
                                                         vector + rng.normal(0.0, noise_std, vector.shape)))
                     for _ in range(draws)])
    finite = aucs[np.isfinite(aucs)]
    if finite.size < draws * 5 / 6:
        return math.inf
    low, high = np.percentile(finite, [16, 84])
    return float((high - low) / 2)


def pooled(statistics: Sequence[EvalStatistics]) -> EvalStatistics | None:
    """The sum of several hospitals' (noised) statistics; None when there are none or their classes differ."""
    if not statistics or len({s.n_classes for s in statistics}) != 1:
        return None
    total = statistics[0]
    for more in statistics[1:]:
        total = total + more
    return total


def statistics_from_metrics(metrics: Mapping[str, float], prefix: str, classes_key: str) -> EvalStatistics | None:
    """The noised statistics a hospital's reply carries as scalar metrics ``<prefix><i>`` with the class count
    under ``classes_key``; None when the reply carries none (exact metrics) or they do not fit."""
    if classes_key not in metrics:
        return None
    n_classes = int(metrics[classes_key])
    if n_classes < 2:
        return None
    values = [metrics.get(f"{prefix}{i}") for i in range(EvalStatistics.size(n_classes))]
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return EvalStatistics.from_vector(n_classes, [float(v) for v in values if v is not None])
