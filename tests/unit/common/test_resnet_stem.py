"""resnet18's stems (``model.stem``): which one ``auto`` builds, shapes of the ImageNet stem at 224 px and on a 64^3
volume, the default kept bit-identical, torchvision's parameter count, and Opacus per-sample gradients through the
max pool."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from medfed.common.config import ModelConfig
from medfed.common.config.model import RESNET_STEMS, ResNetConfig
from medfed.common.errors import ConfigError
from medfed.common.models import build_model, require_dp_compatible
from medfed.common.models.resnet import STEMS, ResNet18, resnet18, resolve_stem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TORCHVISION_RESNET18_PARAMETERS = 11_689_512
"""``sum(p.numel() for p in torchvision.models.resnet18().parameters())`` (3 channels, 1000 classes)."""




def _resnet(stem: str, *, dims: int = 2, channels: int = 1, width: int = 8, n_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ResNetConfig(width=width, stem=stem), spatial_dims=dims, in_channels=channels,
                       n_classes=n_classes)


def _shapes(model: nn.Module, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The output shape of each named encoder layer on ``x``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [model.get_submodule(f"encoder.{name}").register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))) for name in layers]
    try:
        with torch.no_grad():
            shapes["logits"] = tuple(model(x).shape)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@pytest.mark.parametrize(
    ("stem", "image_size", "built"),
    [
        ("auto", None, "small"),  # the registry does not pass the image size: the small stem, as before
        ("auto", 28, "small"),
        ("auto", 127, "small"),
        ("auto", 128, "imagenet"),
        ("auto", 512, "imagenet"),
        ("small", 512, "small"),
        ("imagenet", 28, "imagenet"),
    ],
)
def test_resolve_stem(stem: str, image_size: int | None, built: str) -> None:
    assert resolve_stem(stem, image_size) == built


@pytest.mark.parametrize(
    ("stem", "image_size", "match"),
    [("big", None, r"model\.stem='big'.*auto, small, imagenet"), ("auto", 0, r"image_size=0"),
     ("auto", True, r"image_size=True"), ("auto", "224", r"image_size='224'")],
)
def test_resolve_stem_ill_cases(stem: str, image_size: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_stem(stem, image_size)  # type: ignore[arg-type]


def test_the_config_and_the_model_agree_on_the_stems() -> None:
    # Assert
    assert RESNET_STEMS == STEMS
    assert ResNetConfig().stem == "auto" and ResNetConfig().name == "resnet18"
    assert ResNetConfig(stem="imagenet").factory_options() == {"stem": "imagenet"}  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model\.stem='large' is not allowed; choose one of: auto, small, imagenet"):
        ResNetConfig(stem="large")  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [2, 3])
def test_the_default_stem_is_the_small_stem_bit_for_bit(dims: int) -> None:
    # Prepare: a plain ModelConfig (no stem option), the ResNetConfig default, and stem=small
    side = 28 if dims == 2 else 16
    x = torch.randn(2, 1, *([side] * dims), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="resnet18", width=8), spatial_dims=dims, in_channels=1, n_classes=2)
    models = [plain, _resnet("auto", dims=dims), _resnet("small", dims=dims)]

    # Execute
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        logits = [m(x) for m in models]

    # Assert
    for state, out in zip(states[1:], logits[1:], strict=True):
        assert list(state) == list(states[0])
        assert all(torch.equal(a, b) for a, b in zip(state.values(), states[0].values(), strict=True))
        assert torch.equal(out, logits[0])
    assert [m.stem_kind for m in models] == ["small"] * 3
    assert not any(isinstance(m, nn.MaxPool2d | nn.MaxPool3d) for m in plain.encoder.stem.modules())


def test_the_stems_share_layer_names_and_differ_only_in_the_stem_kernel() -> None:
    small, imagenet = _resnet("small").state_dict(), _resnet("imagenet").state_dict()

    assert list(small) == list(imagenet)
    assert [k for k in small if small[k].shape != imagenet[k].shape] == ["encoder.stem.conv.weight"]
    assert imagenet["encoder.stem.conv.weight"].shape == (8, 1, 7, 7)


def test_imagenet_stem_shapes_at_224_px() -> None:
    # Prepare
    model = _resnet("imagenet", channels=3, n_classes=5)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    # Execute
    shapes = _shapes(model, x, ("stem.conv", "stem.pool", "layer1", "layer2", "layer3", "layer4", "flatten"))

    # Assert: /2 by the convolution, /2 by the pool, then torchvision's 56, 28, 14, 7
    assert shapes["stem.conv"] == (2, 8, 112, 112)
    assert shapes["stem.pool"] == (2, 8, 56, 56)
    assert shapes["layer1"] == (2, 8, 56, 56)
    assert shapes["layer2"] == (2, 16, 28, 28)
    assert shapes["layer3"] == (2, 32, 14, 14)
    assert shapes["layer4"] == (2, 64, 7, 7)
    assert shapes["flatten"] == (2, 64)
    assert shapes["logits"] == (2, 5)


def test_imagenet_stem_shapes_on_a_64_cubed_volume() -> None:
    # Prepare
    model = _resnet("imagenet", dims=3, width=4)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))

    # Execute
    shapes = _shapes(model, x, ("stem.conv", "stem.pool", "layer1", "layer4", "flatten"))

    # Assert
    assert model.get_submodule("encoder.stem.conv").weight.shape == (4, 1, 7, 7, 7)
    assert shapes["stem.conv"] == (1, 4, 32, 32, 32)
    assert shapes["stem.pool"] == (1, 4, 16, 16, 16)
    assert shapes["layer1"] == (1, 4, 16, 16, 16)
    assert shapes["layer4"] == (1, 32, 2, 2, 2)
    assert shapes["flatten"] == (1, 32)
    assert shapes["logits"] == (1, 2)


def test_small_stem_keeps_the_resolution_into_layer1() -> None:
    shapes = _shapes(_resnet("small"), torch.zeros(1, 1, 28, 28), ("stem", "layer1", "layer4"))

    assert shapes["stem"] == (1, 8, 28, 28) and shapes["layer1"] == (1, 8, 28, 28) and shapes["layer4"] == (1, 64, 4, 4)


def test_auto_builds_the_imagenet_stem_when_the_factory_knows_the_images_are_large() -> None:
    # Execute
    large = resnet18(spatial_dims=2, in_channels=1, n_classes=2, width=4, dropout=0.0, stem="auto", image_size=224)
    small = resnet18(spatial_dims=2, in_channels=1, n_classes=2, width=4, dropout=0.0, stem="auto", image_size=64)

    # Assert
    assert isinstance(large, ResNet18) and large.stem_kind == "imagenet"
    assert isinstance(small, ResNet18) and small.stem_kind == "small"


def test_imagenet_stem_width64_has_torchvision_resnet18s_parameter_count() -> None:
    model = _resnet("imagenet", channels=3, width=64, n_classes=1000)

    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_RESNET18_PARAMETERS


def test_imagenet_stem_parameter_count_matches_installed_torchvision() -> None:
    torchvision = pytest.importorskip("torchvision")  # not a medfed dependency: checked only where installed
    reference = torchvision.models.resnet18(weights=None)  # random initialisation: nothing downloads
    model = _resnet("imagenet", channels=3, width=64, n_classes=1000)

    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_imagenet_stem_passes_opacus_validation(dims: int) -> None:
    model = _resnet("imagenet", dims=dims, width=4)

    assert ModuleValidator.validate(model, strict=False) == []
    require_dp_compatible(model, "resnet18")  # raises if Opacus finds a problem


def test_imagenet_stem_per_sample_gradients_and_one_dp_step() -> None:
    # Prepare: a tiny batch at 64 px (stem 64 -> 32 -> 16) through Opacus' per-sample gradient hooks
    model = _resnet("imagenet", width=4)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1])
    private = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1e6,
                            expected_batch_size=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    # Execute
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()  # the mean, as Opacus (loss_reduction="mean") expects
    stem_samples = model.get_submodule("encoder.stem.conv").weight.grad_sample.detach().clone()
    optimizer.step()

    # Assert: one gradient per image for every parameter; the stem's equals that image's own gradient (GroupNorm and
    # max pool keep images independent)
    for name, param in private.named_parameters():
        assert param.grad_sample is not None, name
    assert stem_samples.shape == (3, 4, 1, 7, 7)
    reference = _resnet("imagenet", width=4)
    for index in range(3):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[index : index + 1]), y[index : index + 1]).backward()
        own = reference.get_submodule("encoder.stem.conv").weight.grad
        assert own is not None
        torch.testing.assert_close(stem_samples[index], own, rtol=1e-4, atol=1e-5)
    # no noise and no clipping: the DP step is plain SGD on the mean gradient (sum of per-sample / batch size)
    expected = before["encoder.stem.conv.weight"] - 0.1 * stem_samples.sum(dim=0) / 3
    torch.testing.assert_close(model.get_submodule("encoder.stem.conv").weight.detach(), expected,
                               rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize(("overrides", "built"), [
    (["dataset.image_size=160"], "imagenet"),
    ([], "small"),
    (["dataset.image_size=160", "model.stem=small"], "small"),
    (["model.stem=imagenet"], "imagenet"),
    (["dataset.image_size=160", "task=ssl", "ssl.method=mim"], "imagenet"),
])
def test_a_run_config_picks_the_stem_by_the_dataset_side(overrides: list[str], built: str) -> None:
    # Prepare: the run's model as the coordinator and every hospital build it, from the composed config
    from medfed.common.config import compose_config
    from medfed.common.models.ssl import build_task_model

    cfg = compose_config(["model=resnet18", "model.width=8", *overrides])

    # Execute
    model = build_task_model(cfg, spatial_dims=2, in_channels=1, n_classes=2)

    # Assert: the stem's kernel (an SSL model keeps only the encoder, not the ResNet18 around it)
    kernels = [tuple(m.kernel_size) for name, m in model.named_modules() if name.endswith("stem.conv")]
    assert kernels == [(7, 7) if built == "imagenet" else (3, 3)]
