"""The coordinator's side of a distributed-DP round (server/distributed_dp.py, issue 20): with noise 0 and no
clipping one round is one SGD step on the union of the hospitals' batches (within rounding), and a round with more
hospitals missing than planned is discarded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from medfed.client.integer_gradients import integer_gradient_sum
from medfed.server.distributed_dp import RoundDiscarded, apply_integer_sum, check_participation
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # a frozen weight: kept as it is
    return model


def test_one_round_without_noise_or_clipping_is_one_sgd_step_on_the_union_of_the_batches():
    model = _model()
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 2, (n,), generator=generator))
               for n in (3, 7)]  # two hospitals' sampled batches
    scale, lr, expected = 2.0**16, 0.5, 8.0  # the round's expected images (a constant of the plan)
    total = sum(integer_gradient_sum(model, x, y, clip=1e6, scale=scale).values for x, y in batches)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}

    stepped = apply_integer_sum(weights, names, total, scale=scale, expected_images=expected, lr=lr)

    union = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in union.parameters() if p.requires_grad], lr=lr)
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    (nn.functional.cross_entropy(union(images), labels, reduction="sum") / expected).backward()
    optimizer.step()
    for name, param in union.named_parameters():
        # each image's rounding moves the sum by 1/2 per coordinate at most: 10 images, lr / (scale * expected)
        assert np.abs(stepped[name] - param.detach().numpy()).max() <= 10 * 0.5 * lr / (scale * expected) + 1e-6
    assert np.array_equal(stepped["0.bias"], weights["0.bias"])
    assert not any(np.shares_memory(stepped[k], weights[k]) for k in weights)  # the caller's weights untouched
    assert not np.array_equal(stepped["0.weight"], weights["0.weight"])


def test_a_sum_of_the_wrong_size_or_scale_is_refused():
    weights = {"w": np.zeros((2, 2), dtype=np.float32)}
    with pytest.raises(ValueError, match="3 values, the trainable weights 4"):
        apply_integer_sum(weights, ["w"], np.zeros(3, dtype=np.int64), scale=1.0, expected_images=1.0, lr=1.0)
    for scale, expected in ((1.0, 0.0), (0.0, 1.0)):
        with pytest.raises(ValueError, match="positive"):
            apply_integer_sum(weights, ["w"], np.zeros(4, dtype=np.int64), scale=scale, expected_images=expected,
                              lr=1.0)
    half = apply_integer_sum(weights, ["w"], np.array([1, 0, 0, 0]), scale=0.5, expected_images=0.5, lr=1.0)
    assert half["w"][0, 0] == -4.0  # 1 / (0.5 x 0.5): fractions are scales too
    out = apply_integer_sum(weights, ["w"], np.array([4, 0, 0, -4]), scale=2.0, expected_images=2.0, lr=1.0)
    assert out["w"].tolist() == [[-1.0, 0.0], [0.0, 1.0]] and out["w"].dtype == np.float32


def test_a_round_with_more_hospitals_missing_than_planned_is_discarded():
    check_participation(sampled=5, active=4, max_dropouts=1)
    check_participation(sampled=5, active=5, max_dropouts=0)
    expected = (r"^2 of the round's 5 hospitals .* privacy\.max_dropouts=1: .* stays as it was\. Raise "
                r"privacy\.max_dropouts for the next run \(each hospital then adds more noise\) if hospitals drop "
                r"this often\.$")
    with pytest.raises(RoundDiscarded, match=expected):
        check_participation(sampled=5, active=3, max_dropouts=1)
