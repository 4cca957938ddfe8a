"""Active learning at a site: the stratified start, and uncertainty ranking against random labelling in seeded
runs (a logistic model on a task with a sharp boundary, and the CNN on real PneumoniaMNIST images when they are here)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from medfed.client.active_learning import active_learning_curve, cnn_learner, stratified_start
from medfed.common.errors import ConfigError
from medfed.common.metrics import roc_auc


def test_the_start_holds_every_class_evenly():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)

    start = stratified_start(labels, 7, seed=0)

    assert start.size == 7 and np.unique(start).size == 7
    assert sorted(np.bincount(labels[start], minlength=3).tolist()) == [2, 2, 3]
    with pytest.raises(ConfigError, match="one per class"):
        stratified_start(labels, 2, seed=0)


def _gaussian_task(seed: int):
    """A sharp class boundary at an unknown place (x0 = 0.7) among many points far from it: the labels that
    locate the boundary are the informative ones, which uncertainty finds and random picks rarely."""
    rng = np.random.default_rng(seed)

    def sample(n: int):
        points = np.column_stack([rng.uniform(-5.0, 5.0, n), rng.normal(0.0, 1.0, n)])
        return points, (points[:, 0] > 0.7).astype(np.int64)

    points, labels = sample(3000)
    test_points, test_labels = sample(2000)
    return points, labels, test_points, test_labels


def _logistic(points, labels, test_points, test_labels):
    def learn(labelled):
        model = LogisticRegression(C=100.0).fit(points[labelled], labels[labelled])
        accuracy = float((model.predict(test_points) == test_labels).mean())
        return (lambda idx: model.predict_proba(points[idx])), {
            "acc": accuracy, "auc": roc_auc(test_labels, model.predict_proba(test_points)[:, 1])}

    return learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uncertainty_ranking_beats_random_labelling_in_seeded_runs(seed):
    points, labels, test_points, test_labels = _gaussian_task(seed)
    learner = _logistic(points, labels, test_points, test_labels)

    curves = {method: active_learning_curve(labels, learner, method=method, initial=4, per_step=2, steps=10,
                                            seed=seed) for method in ("entropy", "random")}

    assert [c["labelled"] for c in curves["entropy"]] == list(range(4, 25, 2))
    assert curves["entropy"][0] == curves["random"][0]  # the same start
    late = {m: np.mean([c["acc"] for c in curve[-5:]]) for m, curve in curves.items()}  # 16 to 24 labels
    assert late["entropy"] > late["random"]
    assert curves["entropy"][-1]["acc"] > curves["random"][-1]["acc"]
    assert curves["entropy"][-1]["acc"] >= 0.99  # the boundary found with 24 labels


def test_the_cnn_learner_trains_on_real_images():
    from medfed.client.site import load_site
    from tests.conftest import require_medmnist

    data_dir = require_medmnist("pneumoniamnist")  # the file this test reads
    from medfed.common.config import compose_config
    from medfed.common.data import load_test_set

    cfg = compose_config(["dataset=medmnist", "dataset.name=pneumoniamnist", f"dataset.data_path={data_dir}",
                          "federation.hospitals=5", "model.width=8"])
    site = load_site(cfg, 0, cache_dir=None)
    info, test = load_test_set(cfg)
    learner = cnn_learner(site.train, test, cfg.model, cfg.train, n_classes=2, spatial_dims=2, epochs=3, seed=0)

    curve = active_learning_curve(site.train.labels, learner, method="entropy", initial=20, per_step=20, steps=1,
                                  seed=0)

    assert [c["labelled"] for c in curve] == [20, 40]
    assert all(0.5 < c["auc"] <= 1.0 for c in curve)  # better than chance from 20 labelled images
