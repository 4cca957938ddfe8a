"""Aggregation of the scalar metrics hospitals report (weights are sample counts, never batches)."""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict

__all__ = ["weighted_mean_ignoring_nan"]


def weighted_mean_ignoring_nan(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Weighted mean of every scalar metric over the replies, skipping sites where a metric is undefined.

    A hospital whose validation split holds one class only reports ``val-auc = nan``; Flower's default
    aggregation would turn the federation's AUC into nan. Here such a site simply does not vote on that metric
    (its other metrics still count). A metric undefined at every site stays nan. List-valued metrics are skipped.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        for metrics in record.metric_records.values():
            raw = metrics.get(weighting_metric_name, 0.0)
            weight = 0.0 if isinstance(raw, list) else float(raw)
            for key, value in metrics.items():
                if key == weighting_metric_name or isinstance(value, list):
                    continue
                sums.setdefault(key, 0.0)
                weights.setdefault(key, 0.0)
                if math.isfinite(float(value)) and weight > 0:
                    sums[key] += float(value) * weight
                    weights[key] += weight
    return MetricRecord({k: (sums[k] / weights[k] if weights[k] > 0 else math.nan) for k in sums})
