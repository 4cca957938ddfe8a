"""Tests of common.models: registry, shapes, Opacus compatibility, parameter counts, ill cases."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from medfed.common.config import ModelConfig
from medfed.common.errors import ConfigError
from medfed.common.models import available_models, build_model, group_norm, register_model, require_dp_compatible
from medfed.common.models.resnet import ResNet18
from medfed.common.models.smallcnn import SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPE_CASES = [
    (name, dims, channels, n_classes)
    for name in ("smallcnn", "resnet18")
    for dims in (2, 3)
    for channels in (1, 3)
    for n_classes in (2, 5)
]


def _input(dims: int, channels: int, batch: int = 2) -> torch.Tensor:
    side = 28 if dims == 2 else 16
    return torch.randn(batch, channels, *([side] * dims), generator=torch.Generator().manual_seed(0))


def test_available_models_lists_builtins_sorted() -> None:
    # Execute
    names = available_models()

    # Assert
    assert names == sorted(names)
    assert {"smallcnn", "resnet18"} <= set(names)


@pytest.mark.parametrize(("name", "dims", "channels", "n_classes"), SHAPE_CASES)
def test_output_shape(name: str, dims: int, channels: int, n_classes: int) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), spatial_dims=dims, in_channels=channels, n_classes=n_classes)
    x = _input(dims, channels)

    # Execute
    logits = model(x)
    features = model.forward_features(x)

    # Assert
    assert logits.shape == (2, n_classes)
    assert features.shape == (2, model.head.in_features)
    assert isinstance(model.head, nn.Linear)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("dims", [2, 3])
def test_opacus_compatible(name: str, dims: int) -> None:
    # Prepare
    model = build_model(ModelConfig(name=name, width=8, dropout=0.2), spatial_dims=dims, in_channels=1, n_classes=2)

    # Execute
    errors = ModuleValidator.validate(model, strict=False)

    # Assert
    assert errors == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_opacus_per_sample_gradients(name: str) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=4), spatial_dims=2, in_channels=1, n_classes=2)
    private = GradSampleModule(model)
    x = _input(2, 1, batch=3)
    x.requires_grad = True  # Opacus full backward hooks want an input that requires grad

    # Execute
    nn.functional.cross_entropy(private(x), torch.tensor([0, 1, 1])).backward()

    # Assert
    for param in model.parameters():
        assert param.grad_sample is not None
        assert param.grad_sample.shape == (3, *param.shape)


@pytest.mark.parametrize(("name", "low", "high"), [("smallcnn", 80_000, 250_000), ("resnet18", 2_000_000, 3_500_000)])
def test_parameter_count_2d_grey_width32(name: str, low: int, high: int) -> None:
    # Prepare
    model = build_model(ModelConfig(name=name, width=32), spatial_dims=2, in_channels=1, n_classes=2)

    # Execute
    count = sum(p.numel() for p in model.parameters())

    # Assert
    assert low <= count <= high


def test_resnet18_width64_has_classic_widths() -> None:
    # Execute
    model = ResNet18(spatial_dims=2, in_channels=3, n_classes=10, width=64)

    # Assert
    assert model.num_features == 512
    assert model.head.in_features == 512


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_init_is_deterministic_under_seed(name: str) -> None:
    # Prepare
    cfg = ModelConfig(name=name, width=8)

    # Execute
    torch.manual_seed(123)
    first = build_model(cfg, spatial_dims=2, in_channels=1, n_classes=3).state_dict()
    torch.manual_seed(123)
    second = build_model(cfg, spatial_dims=2, in_channels=1, n_classes=3).state_dict()

    # Assert
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_backward_reaches_every_parameter() -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", width=8), spatial_dims=2, in_channels=1, n_classes=2)

    # Execute
    model(_input(2, 1)).sum().backward()

    # Assert
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        (
            ModelConfig(name="foo"),
            {},
            r"model\.name='foo' is not a registered model; choose one of: (.+, )?resnet18, scatternet, smallcnn",
        ),
        (ModelConfig(), {"spatial_dims": 4}, r"spatial_dims=4"),
        (ModelConfig(), {"spatial_dims": 1}, r"spatial_dims=1"),
        (ModelConfig(), {"n_classes": 1}, r"n_classes=1 .*>= 2"),
        (ModelConfig(), {"in_channels": 0}, r"in_channels=0 .*>= 1"),
        (ModelConfig(name="resnet18"), {"n_classes": 1}, r"n_classes=1"),
    ],
)
def test_build_model_ill_cases(cfg: ModelConfig, kwargs: dict[str, int], match: str) -> None:
    # Prepare
    args = {"spatial_dims": 2, "in_channels": 1, "n_classes": 2} | kwargs

    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"width=0"),
        ({"dropout": 1.0}, r"dropout=1\.0"),
        ({"spatial_dims": 3, "convs_per_stage": (1, 0)}, r"convs_per_stage=\(1, 0\)"),
    ],
)
def test_smallcnn_constructor_ill_cases(kwargs: dict[str, object], match: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        SmallCNN(**kwargs)  # type: ignore[arg-type]


def test_register_model_refuses_a_taken_name() -> None:
    # Prepare
    def other(*, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float) -> nn.Module:
        return nn.Identity()

    # Execute / Assert
    with pytest.raises(ValueError, match="'smallcnn' is already registered"):
        register_model("smallcnn")(other)


@pytest.mark.parametrize(("channels", "groups"), [(1, 1), (8, 4), (32, 16), (48, 24), (64, 32), (512, 32), (7, 1)])
def test_group_norm_groups(channels: int, groups: int) -> None:
    # Execute
    norm = group_norm(channels)

    # Assert
    assert norm.num_groups == groups
    assert channels % norm.num_groups == 0


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("dims", [2, 3])
def test_batch_norm_models_keep_float_state_and_train_their_statistics(name: str, dims: int) -> None:
    # Prepare
    cfg = ModelConfig(name=name, width=8, norm="batch")
    torch.manual_seed(0)
    model = build_model(cfg, spatial_dims=dims, in_channels=1, n_classes=2)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    x = _input(dims, 1, batch=4)

    # Execute
    model.train()
    model(x)
    state = model.state_dict()
    fresh = build_model(cfg, spatial_dims=dims, in_channels=1, n_classes=2)
    fresh.load_state_dict(state)  # strict: no counter is expected or added
    model.eval()
    fresh.eval()

    # Assert
    assert norms and not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not [k for k in state if "num_batches_tracked" in k]
    assert {v.dtype for v in state.values()} == {torch.float32}  # what FedAvg averages
    assert not torch.allclose(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    assert torch.equal(model(x), fresh(x))


def test_batch_norm_models_are_refused_for_dp_by_opacus() -> None:
    # Prepare
    model = build_model(ModelConfig(norm="batch"), spatial_dims=2, in_channels=1, n_classes=2)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"cannot be trained with differential privacy.*model\.norm=group"):
        require_dp_compatible(model, "smallcnn")


def test_unknown_norm_is_refused_with_the_choices() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"model\.norm='layer' .*group, batch"):
        ModelConfig(norm="layer")
    with pytest.raises(ConfigError, match=r"model\.norm='instance' .*group, batch"):
        SmallCNN(norm="instance")
