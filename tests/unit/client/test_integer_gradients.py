"""A hospital's integer contribution to a distributed-DP round (client/integer_gradients.py, issue 20): with no
clipping it is one SGD step's summed gradient within rounding, one image moves it by at most the sensitivity the
accountant uses, and the model comes back as it went in."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from medfed.client.integer_gradients import IntegerSum, integer_gradient_sum, noised_contribution
from medfed.common.skellam import IntegerTransport, rounded_sensitivity, skellam_share
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 2, (n,), generator=generator)


def _autograd_sum(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    model = copy.deepcopy(model)
    nn.functional.cross_entropy(model(images), labels, reduction="sum").backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]).double().numpy()


def test_without_clipping_the_integer_sum_is_the_batchs_gradient_within_rounding():
    model, (images, labels) = _model(), _batch()
    scale = 2.0**12

    total = integer_gradient_sum(model, images, labels, clip=1e6, scale=scale)

    assert total.values.dtype == np.int64 and total.images == 6 and total.clipped == 0
    error = np.abs(total.values / scale - _autograd_sum(model, images, labels))
    assert error.max() <= 6 * 0.5 / scale + 1e-6  # each image's rounding moves a coordinate by at most 1/2


def test_one_image_moves_the_sum_by_at_most_the_accounted_sensitivity():
    model, (images, labels) = _model(), _batch()
    clip, scale = 0.05, 64.0  # every image clipped; a scale small enough that rounding shows
    dim = sum(p.numel() for p in model.parameters())

    with_it = integer_gradient_sum(model, images, labels, clip=clip, scale=scale)
    without = integer_gradient_sum(model, images[1:], labels[1:], clip=clip, scale=scale)

    l2, l1 = rounded_sensitivity(clip, scale, dim)
    moved = (with_it.values - without.values).astype(np.float64)
    assert clip * scale - math.sqrt(dim) / 2 <= np.linalg.norm(moved) <= l2
    assert np.abs(moved).sum() <= l1
    assert with_it.clipped == 6 and without.clipped == 5


def test_the_model_comes_back_unwrapped_and_frozen_layers_are_left_out():
    model, (images, labels) = _model(), _batch()
    model[0].weight.requires_grad_(False)
    before = model(images).detach()

    total = integer_gradient_sum(model, images, labels, clip=1.0, scale=1024.0)

    assert total.values.shape == (sum(p.numel() for p in model.parameters() if p.requires_grad),)
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(model(images).detach(), before)
    empty = integer_gradient_sum(model, images[:0], labels[:0], clip=1.0, scale=1024.0)
    assert empty.images == 0 and empty.clipped == 0 and not empty.values.any()
    assert empty.values.shape == total.values.shape and empty.values.dtype == np.int64
    for clip, scale in ((0.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="positive"):
            integer_gradient_sum(model, images, labels, clip=clip, scale=scale)
    assert integer_gradient_sum(model, images, labels, clip=1.0, scale=0.5).images == 6  # any positive scale


def test_each_image_is_clipped_to_the_clip_and_no_further():
    model, (images, labels) = _model(), _batch()
    norms = [float(np.linalg.norm(_autograd_sum(model, images[i:i + 1], labels[i:i + 1]))) for i in range(6)]
    i = next(k for k, n in enumerate(norms) if n < 1.0)  # a gradient shorter than 1 (the clamp's floor is far below)
    scale, dim = 2.0**20, sum(p.numel() for p in model.parameters())
    for clip, expected in ((norms[i] / 2, norms[i] / 2), (norms[i] * 2, norms[i])):  # clipped, then left alone
        one = integer_gradient_sum(model, images[i:i + 1], labels[i:i + 1], clip=clip, scale=scale)
        assert abs(np.linalg.norm(one.values.astype(np.float64)) - expected * scale) <= np.sqrt(dim) / 2
        assert one.clipped == (expected < norms[i])


def test_the_contribution_adds_the_share_and_counts_what_the_transport_clips():
    transport = IntegerTransport(3, modulus_range=2**12)  # integers within +-512
    total = IntegerSum(np.array([5, -5, 600, 0], dtype=np.int64), images=2, clipped=0)

    exact, overflow = noised_contribution(total, 0.0, transport, np.random.default_rng(0))
    assert exact.tolist() == [5.0, -5.0, 512.0, 0.0] and overflow == 1

    share = skellam_share((4,), 50.0, np.random.default_rng(7))
    assert noised_contribution(total, 50.0, transport, np.random.default_rng(7))[0].tolist() == \
        np.clip(total.values + share, -512, 512).tolist()  # the share is added, not subtracted
    noised = np.stack([noised_contribution(total, 50.0, transport, np.random.default_rng(k))[0] for k in range(400)])
    assert noised[:, [0, 1, 3]].var(axis=0) == pytest.approx([50.0] * 3, rel=0.25)
    assert noised[:, 0].mean() == pytest.approx(5.0, abs=1.5)


def test_per_view_logits_give_each_image_the_mean_of_its_views_losses():
    torch.manual_seed(0)
    head = nn.Linear(5, 2)  # features (B, V, F) -> logits (B, V, classes), as a fixed front end's head gives
    features = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 1, 0])
    scale = 2.0**14

    total = integer_gradient_sum(head, features, labels, clip=1e6, scale=scale)

    reference = copy.deepcopy(head)
    losses = [nn.functional.cross_entropy(reference(f), labels[i].repeat(3)) for i, f in enumerate(features)]
    torch.stack(losses).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).double().numpy()
    assert np.abs(total.values / scale - expected).max() <= 4 * 0.5 / scale + 1e-6
