"""The membership-inference audit: attack metrics by hand, an over-fitted model is caught, shuffled labels are not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from medfed.client.audit import attack_metrics, membership_audit, true_class_logit
from medfed.client.training import train_epochs
from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.data import ArrayDataset, DatasetInfo, SiteData
from medfed.common.models import build_model


def _site(n_train: int = 40, n_val: int = 40, seed: int = 0) -> SiteData:
    """Random images with random labels: nothing to learn, so a model can only memorise its training images."""
    rng = np.random.default_rng(seed)
    images = rng.random((n_train + n_val, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 2, size=n_train + n_val).astype(np.int64)
    info = DatasetInfo(name="noise", n_classes=2, channels=1, spatial_dims=2, class_names=("a", "b"), image_size=28)
    return SiteData("site-0", ArrayDataset(images[:n_train], labels[:n_train]),
                    ArrayDataset(images[n_train:], labels[n_train:]), info)


def _overfitted(site: SiteData, epochs: int):
    cfg = compose_config(["model=scatternet", "model.pool=7", "train.optimizer=adam", "train.lr=0.01",
                          "train.weight_decay=0", "train.batch_size=40", "train.rounds=1", "train.local_epochs=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    train_epochs(model, site.train, cfg.train, epochs=epochs, n_classes=2, spatial_dims=2, seed=0)
    return cfg, model.eval()


def test_attack_metrics_by_hand() -> None:
    perfect = attack_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    coin = attack_metrics(np.array([1.0, 2.0]), np.array([1.0, 2.0]))

    assert perfect == {"auc": 1.0, "tpr_at_0.01": 1.0, "tpr_at_0.001": 1.0}
    assert coin["auc"] == 0.5 and coin["tpr_at_0.01"] == 0.0  # nothing above the largest non-member score
    assert np.isnan(attack_metrics(np.array([]), np.array([1.0]))["auc"])


def test_true_class_logit_is_the_log_odds_of_the_true_class() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(torch.tensor(logits), 1).numpy()
    expected = np.log(p[[0, 1], [0, 2]]) - np.log(1 - p[[0, 1], [0, 2]])
    np.testing.assert_allclose(true_class_logit(logits, np.array([0, 2])), expected, rtol=1e-9)


def test_an_overfitted_model_is_caught_and_shuffled_membership_is_not() -> None:
    # Prepare: a head trained 300 epochs on 40 random-label images (memorised), 40 held-out images
    site = _site()
    cfg, model = _overfitted(site, epochs=300)

    # Execute
    audit = membership_audit(cfg, site, model, shadows=0)

    # Assert: the loss attack tells members from non-members
    assert audit[f"{keys.AUDIT_PREFIX}loss-auc"] > 0.8
    # with the membership labels shuffled the same scores carry no signal: around 0.5 on average
    pooled = ArrayDataset(np.concatenate([site.train.images, site.val.images]),
                          np.concatenate([site.train.labels, site.val.labels]))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.from_numpy(pooled.images)), 1).numpy()
    scores = log_probs[np.arange(len(pooled)), pooled.labels]
    rng = np.random.default_rng(0)
    shuffled = []
    for _ in range(50):
        member = rng.permutation(np.r_[np.ones(40, bool), np.zeros(40, bool)])
        shuffled.append(attack_metrics(scores[member], scores[~member])["auc"])
    assert abs(float(np.mean(shuffled)) - 0.5) < 0.05


def test_offline_lira_with_shadows_catches_the_overfitted_model_too() -> None:
    site = _site(n_train=24, n_val=24, seed=1)
    cfg, model = _overfitted(site, epochs=200)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_epochs=50))

    audit = membership_audit(cfg, site, model, shadows=4)

    assert audit[f"{keys.AUDIT_PREFIX}lira-auc"] > 0.7
    assert set(audit) >= {f"{keys.AUDIT_PREFIX}lira-{m}" for m in ("auc", "tpr_at_0.01", "tpr_at_0.001")}
    assert all(isinstance(v, float) for v in audit.values())


def test_audit_config_is_checked() -> None:
    from medfed.common.errors import ConfigError

    with pytest.raises(ConfigError, match="audit_shadows=4 asks for LiRA shadow models, but evaluate.audit=false"):
        compose_config(["evaluate.audit_shadows=4"])
    with pytest.raises(ConfigError, match=r"audit_shadows=100 is out of range"):
        compose_config(["evaluate.audit=true", "evaluate.audit_shadows=100"])
