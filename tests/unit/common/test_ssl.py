"""Self-supervised pretraining (SimCLR, MIM), label scarcity and representation quality: the pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfed.common.config import SSLConfig, compose_config
from medfed.common.data import load_site
from medfed.common.models import build_model, save_checkpoint, state_dict_to_numpy
from medfed.common.models.pretrained import load_pretrained
from medfed.common.models.ssl import MIMModel, build_ssl_model, nt_xent
from medfed.common.representation import davies_bouldin, representation_quality, silhouette
from tests.conftest import shared_medmnist


def _images(n: int = 192) -> np.ndarray:
    """Real images when the shared BreastMNIST file is here, else the synthetic task's."""
    path = shared_medmnist("breastmnist")
    if path is not None:
        return (np.load(path)["train_images"][:n, None] / 255.0).astype(np.float32)
    images = load_site(compose_config(["dataset.n_train=1200"]), 0).train.images[:n]
    assert len(images) == n, f"the synthetic fallback has {len(images)} images, {n} asked"
    return images


def test_nt_xent_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    terms = nt_xent(z1, z1.clone(), temperature=1.0)

    # each view: its partner at similarity 1, the two others at 0 -> -log(e / (e + 1 + 1))
    assert terms.shape == (4,)
    assert torch.allclose(terms, torch.full((4,), -math.log(math.e / (math.e + 2))))
    assert nt_xent(z1, -z1, 1.0).mean() > terms.mean()  # views pointing apart cost more


def test_mim_hides_the_asked_fraction_in_patches():
    model = MIMModel(torch.nn.Identity(), 1, 1, 2, SSLConfig(method="mim", mask_ratio=0.3, patch_size=4))
    torch.manual_seed(0)

    mask = model.mask(torch.zeros(64, 1, 28, 28))

    assert mask.shape == (64, 1, 28, 28)
    assert 0.25 < float(mask.mean()) < 0.35
    assert torch.equal(mask[:, :, :4, :4].amax(dim=(2, 3)), mask[:, :, :4, :4].amin(dim=(2, 3)))  # whole patches


def test_an_ssl_checkpoint_starts_a_classifier(tmp_path):
    cfg = compose_config(["model.width=8"])
    ssl_model = build_ssl_model(cfg.model, SSLConfig(method="simclr"), spatial_dims=2, in_channels=1)
    save_checkpoint(tmp_path / "encoder.pt", state_dict_to_numpy(ssl_model), {"round": 1})
    classifier = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)

    report = load_pretrained(classifier, tmp_path / "encoder.pt")

    encoder = {k: v for k, v in classifier.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(v, ssl_model.state_dict()[k]) for k, v in encoder.items())
    assert all(k.startswith("projector.") for k in report.skipped) and report.skipped
    assert report.missing == ["head.bias", "head.weight"]


@pytest.mark.parametrize("fraction", [0.1, 0.01])
def test_label_fraction_keeps_a_stratified_count_per_hospital(fraction):
    full = compose_config(["federation.hospitals=3", "federation.partition=dirichlet"])
    scarce = compose_config(["federation.hospitals=3", "federation.partition=dirichlet",
                             f"dataset.label_fraction={fraction}"])
    for index in range(3):
        labels = load_site(full, index).train.labels
        site = load_site(scarce, index)
        expected = [max(1, round(fraction * int(np.sum(labels == c)))) for c in np.unique(labels)]
        assert np.bincount(site.train.labels)[np.unique(labels)].tolist() == expected
        assert len(site.val) == len(load_site(full, index).val)  # validation untouched
    ssl = compose_config(["dataset.label_fraction=0.1", "task=ssl"])
    assert len(load_site(ssl, 0).train) == len(load_site(compose_config([]), 0).train)  # SSL sees every image


def test_silhouette_and_davies_bouldin_match_scikit_learn(tmp_path):
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    points = rng.normal(size=(120, 5)) + labels[:, None] * 1.5

    assert silhouette(points, labels) == pytest.approx(silhouette_score(points, labels))
    assert davies_bouldin(points, labels) == pytest.approx(davies_bouldin_score(points, labels))
    assert math.isnan(silhouette(points, np.zeros(120)))
    encoder = build_model(compose_config(["model.width=8"]).model, spatial_dims=2, in_channels=1, n_classes=2).encoder
    quality = representation_quality(encoder, _images(60), np.arange(60) % 2, plot=tmp_path / "pca.png")
    assert (tmp_path / "pca.png").stat().st_size > 1000 and quality["dims"] == 32 and quality["n"] == 60
    assert representation_quality(encoder, _images(60), np.arange(60) % 2, max_images=25)["n"] == 25


@pytest.mark.parametrize("shape", [(16, 1, 28, 28), (4, 1, 16, 16, 16)])
def test_every_image_draws_its_own_view(shape):
    """Views shared by several images let SimCLR learn the transform instead of the image (measured: a linear
    probe at AUC 0.68 instead of 0.89 on PneumoniaMNIST): identical images must get different views."""
    from medfed.common.models.ssl import ContrastiveViews

    torch.manual_seed(0)
    image = torch.rand(1, *shape[1:])
    views = ContrastiveViews(len(shape) - 2)(image.expand(*shape).contiguous())

    assert views.shape == shape and views.dtype == torch.float32
    flat = views.flatten(1)
    distance = torch.cdist(flat, flat)
    assert bool((distance + torch.eye(shape[0]) * 1e9 > 1e-3).all())  # no two images share a view


def test_views_without_randomness_are_the_image_and_flips_are_exact():
    from medfed.common.models.ssl import ContrastiveViews

    x = torch.rand(4, 1, 28, 28)
    plain = dict(crop=1.0, rotate_deg=0.0, intensity=0.0, noise=0.0)

    assert torch.allclose(ContrastiveViews(2, flip_prob=0.0, **plain)(x), x, atol=1e-5)
    assert torch.allclose(ContrastiveViews(2, flip_prob=1.0, **plain)(x), x.flip(2).flip(3), atol=1e-5)


def test_an_images_masked_modelling_loss_does_not_depend_on_the_other_images():
    # what a noised sum of per-image losses (metered SSL evaluation under DP) needs: removing one image changes
    # the sum by that image's loss only
    from medfed.common.models.ssl import ssl_image_losses

    cfg = compose_config(["model.width=8", "task=ssl", "ssl.method=mim"])
    model = build_ssl_model(cfg.model, cfg.ssl, spatial_dims=2, in_channels=1)
    images = np.random.default_rng(0).random((6, 1, 28, 28)).astype(np.float32)

    every = ssl_image_losses(model, images, seed=3)
    without_first = ssl_image_losses(model, images[1:], seed=3)

    np.testing.assert_allclose(every[1:], without_first)
    assert np.all(every > 0) and len(set(np.round(every, 6))) == 6


def test_ssl_pretraining_takes_its_own_defaults_and_explicit_values_win():
    ssl = compose_config(["task=ssl"]).train
    assert (ssl.batch_size, ssl.lr, ssl.rounds) == (128, 3e-3, 10)
    assert compose_config(["task=ssl", "train.batch_size=64"]).train.batch_size == 64
    supervised = compose_config([]).train
    assert (supervised.batch_size, supervised.rounds) == (32, 5)
    # under DP-SGD (masked image modelling) the privacy recipe's defaults stand: no larger batch by default
    assert compose_config(["task=ssl", "ssl.method=mim", "privacy=dp"]).train.batch_size == 32
