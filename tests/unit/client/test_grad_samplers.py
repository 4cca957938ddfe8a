"""medfed's channels-last convolution per-sample gradients: the same values as Opacus' sampler and as per-image
autograd, for the layer shapes the registered models use and the edge cases (stride, dilation, 'same'/'valid'
padding, no bias, 3D, an empty batch); other convolutions go to Opacus' sampler."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from torch import nn

from medfed.client.grad_samplers import channels_last_applies, conv_grad_sample

LAYERS = {
    "3x3 same size": (lambda: nn.Conv2d(3, 8, 3, padding=1), (4, 3, 9, 11)),
    "7x7 stride 2 (resnet stem)": (lambda: nn.Conv2d(2, 8, 7, stride=2, padding=3), (3, 2, 17, 16)),
    "stride 2 no padding no bias": (lambda: nn.Conv2d(3, 5, 3, stride=2, bias=False), (4, 3, 13, 12)),
    "'same' with dilation, 3x5": (lambda: nn.Conv2d(3, 4, (3, 5), padding="same", dilation=(2, 1)), (2, 3, 12, 10)),
    "'valid'": (lambda: nn.Conv2d(2, 4, 2, padding="valid"), (3, 2, 7, 6)),
    "1x1 stride 2 (resnet shortcut)": (lambda: nn.Conv2d(4, 6, 1, stride=2, bias=False), (3, 4, 8, 8)),
    "3D 3x3x3": (lambda: nn.Conv3d(2, 6, 3, padding=1), (3, 2, 6, 7, 8)),
    "3D anisotropic stride": (lambda: nn.Conv3d(2, 3, (1, 3, 3), stride=(1, 2, 2), padding="valid"), (2, 2, 5, 9, 8)),
}


def _per_image_autograd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's weight and bias gradient by its own autograd pass (loss = <output, grad_out>)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layer.named_parameters()}
    for image, grad in zip(x, grad_out, strict=True):
        layer.zero_grad()
        (layer(image[None]) * grad[None]).sum().backward()
        for name, p in layer.named_parameters():
            out[name].append(p.grad.detach().clone())
    return {name: torch.stack(grads) for name, grads in out.items()}


@pytest.mark.parametrize("case", list(LAYERS))
def test_per_sample_gradients_equal_opacus_and_per_image_autograd(case: str) -> None:
    make, shape = LAYERS[case]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    grad_out = torch.randn_like(layer(x))

    ours = conv_grad_sample(layer, [x], grad_out)
    opacus = opacus_conv_grad_sample(layer, [x], grad_out)
    reference = _per_image_autograd(layer, x, grad_out)

    assert channels_last_applies(layer)
    assert {p.shape for p in ours} == {p.shape for p in opacus}
    for name, p in layer.named_parameters():
        assert ours[p].shape == (shape[0], *p.shape)
        torch.testing.assert_close(ours[p], reference[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[p], opacus[p], rtol=1e-4, atol=1e-5)


def test_grouped_and_non_zero_padded_convolutions_go_to_opacus() -> None:
    torch.manual_seed(0)
    for layer in (nn.Conv2d(4, 8, 3, groups=2, padding=1), nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")):
        x = torch.randn(3, layer.in_channels, 6, 6)
        grad_out = torch.randn_like(layer(x))

        ours = conv_grad_sample(layer, [x], grad_out)

        assert not channels_last_applies(layer)
        expected = opacus_conv_grad_sample(layer, [x], grad_out)
        for p in layer.parameters():
            torch.testing.assert_close(ours[p], expected[p])


def test_an_empty_batch_gives_empty_per_sample_gradients() -> None:
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.zeros(0, 2, 5, 5)

    ours = conv_grad_sample(layer, [x], layer(x))

    assert ours[layer.weight].shape == (1, 3, 2, 3, 3) and not ours[layer.weight].any()
    assert ours[layer.bias].shape == (1, 3)


def test_opacus_uses_the_registered_sampler_for_2d_and_3d_convolutions() -> None:
    model = GradSampleModule(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)))

    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] is conv_grad_sample
    model(torch.randn(3, 1, 6, 6)).sum().backward()
    assert model._module[0].weight.grad_sample.shape == (3, 2, 1, 3, 3)
