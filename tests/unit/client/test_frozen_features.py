"""Fixed features computed once per site, augmentation multiplicity and the moving average of the head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from medfed.client.frozen_features import ViewMeanCrossEntropy, frozen_head
from medfed.client.training import DPTraining, derive_seed, train_epochs
from medfed.common.config import AugmentConfig, ModelConfig, ScatterNetConfig, TrainConfig
from medfed.common.data import ArrayDataset
from medfed.common.models import build_model


def _data(n: int = 6, side: int = 16, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(images=rng.random((n, 1, side, side), dtype=np.float32),
                        labels=np.arange(n, dtype=np.int64) % 2)


def _recipe(**changes) -> TrainConfig:
    base = TrainConfig(optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, batch_size=6, aug_views=3,
                       augment=AugmentConfig(flip_prob=0.5, rotate_deg=10.0, scale=0.1, intensity=0.1, prob=1.0))
    return dataclasses.replace(base, **changes)


def test_a_dp_step_with_augmentation_multiplicity_is_the_mean_of_clipped_view_averaged_gradients(tmp_path) -> None:
    # Prepare: a scatternet head, 6 images x 3 views, one full-batch DP step with noise 0 and a tight clip
    torch.manual_seed(0)
    data, cfg, clip = _data(), _recipe(), 0.05
    model = build_model(ScatterNetConfig(), spatial_dims=2, in_channels=1, n_classes=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = frozen_head(model, data, views=3, augment=cfg.augment, spatial_dims=2, seed=derive_seed(cfg.seed, "views"),
                         cache_dir=tmp_path, device=torch.device("cpu"))
    assert frozen is not None and frozen.data.images.shape[:2] == (6, 3)

    # the expected update, by hand: each image's gradient of its view-averaged loss (plain autograd), clipped to
    # `clip`, averaged over the images (Poisson sampling at rate 1 takes them all)
    features = torch.from_numpy(frozen.data.images)
    clipped = []
    for i in range(len(data)):
        model.zero_grad()
        logits = frozen.head(features[i : i + 1])  # (1, V, C)
        torch.nn.functional.cross_entropy(logits[0], torch.full((3,), int(data.labels[i]))).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        clipped.append([g * min(1.0, clip / (float(norm) + 1e-6)) for g in grads])
    mean = [torch.stack([c[k] for c in clipped]).mean(0) for k in range(len(clipped[0]))]
    expected = {name: start[name] - cfg.lr * g for name, g in zip(("head.weight", "head.bias"), mean, strict=True)}

    # Execute: the same step through train_epochs (Opacus, reading the cached features)
    model.load_state_dict(start)
    result = train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=0,
                          privacy=DPTraining(noise_multiplier=0.0, max_grad_norm=clip), feature_cache=tmp_path)

    # Assert
    assert result.steps == 1 and result.sample_rate == 1.0 and result.num_examples == 6
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_features_are_computed_once_and_read_back_from_the_site_cache(tmp_path, monkeypatch) -> None:
    data, cfg = _data(), _recipe(aug_views=1)
    model = build_model(ScatterNetConfig(), spatial_dims=2, in_channels=1, n_classes=2)
    train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=0, feature_cache=tmp_path)
    (cached,) = tmp_path.glob("features-*.npy")
    calls = []
    original = type(model).front_features
    monkeypatch.setattr(type(model), "front_features", lambda self, x: calls.append(1) or original(self, x))

    train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=1, feature_cache=tmp_path)

    assert calls == []  # the second round read the cache
    assert np.load(cached).shape == (6, 81, 4, 4)
    other = _data(seed=1)  # other images: other features, another file
    train_epochs(model, other, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=1, feature_cache=tmp_path)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2


def test_a_linear_probe_trains_its_head_on_features_computed_once_per_call_and_keeps_the_encoder(
    tmp_path, monkeypatch
) -> None:
    data, cfg = _data(side=28), _recipe(aug_views=2)
    model = build_model(ModelConfig(finetune="linear_probe"), spatial_dims=2, in_channels=1, n_classes=2)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = model.head.weight.detach().clone()
    calls = []
    original = type(model).forward_features
    monkeypatch.setattr(type(model), "forward_features", lambda self, x: calls.append(len(x)) or original(self, x))

    train_epochs(model, data, cfg, epochs=5, n_classes=2, spatial_dims=2, seed=0, feature_cache=tmp_path,
                 privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0))

    assert calls == [6, 6]  # the two views of the 6 images, once: not the encoder at each of the 5 steps
    # (a frozen encoder travels with the model and comes back from FedAvg not bit for bit: nothing is cached)
    assert not list(tmp_path.glob("features-*.npy"))
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not torch.equal(head, model.head.weight)


def test_the_moving_average_leaves_the_model_between_its_start_and_its_last_step(tmp_path) -> None:
    data = _data()
    runs = {}
    for decay in (0.0, 0.9):
        torch.manual_seed(0)
        model = build_model(ScatterNetConfig(), spatial_dims=2, in_channels=1, n_classes=2)
        start = model.head.weight.detach().clone()
        train_epochs(model, data, _recipe(aug_views=1, batch_size=2, ema_decay=decay), epochs=3, n_classes=2,
                     spatial_dims=2, seed=0, feature_cache=tmp_path)
        runs[decay] = (start, model.head.weight.detach().clone())
    (start, last), (_, averaged) = runs[0.0], runs[0.9]
    assert torch.equal(start, runs[0.9][0])
    # 9 steps at decay 0.9: the average is pulled towards the start, so it lies closer to it than the last step
    assert (averaged - start).norm() < (last - start).norm()
    assert not torch.equal(averaged, last)


def test_view_mean_cross_entropy_averages_views_then_reduces_images() -> None:
    logits = torch.randn(4, 3, 2)
    labels = torch.tensor([0, 1, 1, 0])
    per_image = torch.stack([torch.nn.functional.cross_entropy(logits[i], labels[i].repeat(3)) for i in range(4)])

    assert torch.allclose(ViewMeanCrossEntropy(reduction="sum")(logits, labels), per_image.sum())
    assert torch.allclose(ViewMeanCrossEntropy()(logits, labels), per_image.mean())
    with pytest.raises(ValueError):
        ViewMeanCrossEntropy()(logits.reshape(2, 2, 3, 2), labels)


@pytest.mark.parametrize("head", ["linear", "cnn"])
def test_ghost_clipping_clips_each_image_like_the_hooks_mode(tmp_path, head) -> None:
    # Prepare: the same full-batch DP step (noise 0, a tight clip) on a head with 3 views, in both Opacus modes
    data, cfg = _data(), _recipe()
    updates = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = build_model(ScatterNetConfig(head=head), spatial_dims=2, in_channels=1, n_classes=2)

        # Execute
        train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=0, feature_cache=tmp_path,
                     privacy=DPTraining(noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=mode))
        updates[mode] = model.state_dict()

    # Assert: ghost clipping bounds each image's view-averaged gradient as the per-sample hooks do
    for name, value in updates["hooks"].items():
        torch.testing.assert_close(updates["ghost"][name], value, rtol=1e-4, atol=1e-6)


def test_dp_training_with_per_step_augmentation_goes_through_the_fixed_front_end(tmp_path) -> None:
    # one view and train.augment: the images are augmented at every step, so nothing is cached
    data = _data(side=28)
    cfg = _recipe(aug_views=1, augment=AugmentConfig(enabled=True))
    model = build_model(ScatterNetConfig(), spatial_dims=2, in_channels=1, n_classes=2)
    before = model.head.weight.detach().clone()

    result = train_epochs(model, data, cfg, epochs=1, n_classes=2, spatial_dims=2, seed=0, feature_cache=tmp_path,
                          privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0))

    assert result.steps == 1 and not torch.equal(before, model.head.weight)
    assert not list(tmp_path.glob("features-*.npy"))
