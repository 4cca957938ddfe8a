"""Tests of common.models.monai_nets: ``densenet121`` shapes, MONAI equivalence, Opacus, medfed's hooks (SSL,
fine-tuning, personalisation, Grad-CAM) and one epoch of training on volumes. Tiny widths keep them fast."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from medfed.client.personalization import local_layer_names
from medfed.client.training import train_epochs
from medfed.common.config import ModelConfig, compose_config
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError
from medfed.common.explain import default_target_layer, gradcam_maps
from medfed.common.models import available_models, build_model, require_dp_compatible
from medfed.common.models.monai_nets import DenseNet121, densenet_groups, monai_key
from medfed.common.models.smallcnn import FederatedBatchNorm2d
from medfed.common.models.ssl import MIMModel, build_task_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE_CASES = [(2, 64, 1, 2), (2, 64, 3, 5), (2, 28, 1, 2), (2, 17, 1, 2), (3, 32, 1, 2), (3, 17, 2, 3)]


def _input(dims: int, side: int, channels: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *([side] * dims), generator=torch.Generator().manual_seed(0))


def _dense(dims: int = 2, *, width: int = 4, channels: int = 1, n_classes: int = 2, **cfg: object) -> nn.Module:
    return build_model(ModelConfig(name="densenet121", width=width, **cfg), spatial_dims=dims,
                       in_channels=channels, n_classes=n_classes)


def test_densenet121_is_registered() -> None:
    assert "densenet121" in available_models()


@pytest.mark.parametrize(("dims", "side", "channels", "n_classes"), SHAPE_CASES)
def test_output_and_feature_shapes(dims: int, side: int, channels: int, n_classes: int) -> None:
    # Prepare: width 4 ends with 32 * 4 = 128 features; sides not a multiple of 32 (28, 20) still run
    model = _dense(dims, channels=channels, n_classes=n_classes).eval()
    x = _input(dims, side, channels)

    # Execute
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)

    # Assert
    assert logits.shape == (2, n_classes)
    assert features.shape == (2, model.num_features) and model.num_features == 128
    assert model.spatial_dims == dims and isinstance(model.head, nn.Linear)


def test_classic_width_has_monais_parameters_and_initialisation() -> None:
    # Prepare: width 32, 3 channels, 1000 classes, BatchNorm is MONAI's (and torchvision's) DenseNet-121
    from monai.networks.nets import DenseNet121 as MonaiDenseNet121

    torch.manual_seed(0)
    ours = _dense(2, width=32, channels=3, n_classes=1000, norm="batch")
    torch.manual_seed(0)
    reference = MonaiDenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)

    # Execute
    theirs = {monai_key(k): v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}

    # Assert: 7,978,856 parameters, the same tensors under medfed's names, no integer batch counters
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 7_978_856
    assert sum(p.numel() for p in _dense(2, width=32, channels=3, n_classes=1000).parameters()) == 7_978_856
    state = ours.state_dict()
    assert sorted(state) == sorted(theirs)
    for key, value in state.items():
        assert torch.equal(value, theirs[key]), key


def test_group_norm_output_equals_monais_network_on_a_multiple_of_32() -> None:
    # Prepare: MONAI's network with the same GroupNorm and out-of-place ReLUs, and the same seed
    from monai.networks.nets import DenseNet121 as MonaiDenseNet121

    torch.manual_seed(0)
    ours = _dense(3, width=4).eval()
    torch.manual_seed(0)
    reference = MonaiDenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                                 act=("relu", {"inplace": False}), norm=("group", {"num_groups": 4})).eval()
    x = _input(3, 32)

    # Execute
    with torch.no_grad():
        got, want = ours(x), reference(x)

    # Assert
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("width", "groups"), [(32, 32), (64, 32), (48, 24), (4, 4), (7, 7), (1, 1)])
def test_group_count_divides_every_norm(width: int, groups: int) -> None:
    assert densenet_groups(width) == groups
    if width <= 8:
        norms = [m for m in _dense(2, width=width).modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_groups == groups and m.num_channels % groups == 0 for m in norms)


@pytest.mark.parametrize("dims", [2, 3])
def test_group_norm_passes_opacus_and_batch_norm_is_refused(dims: int) -> None:
    # Prepare
    model = _dense(dims, channels=3, n_classes=3)
    batch = _dense(dims, norm="batch")

    # Assert: no BatchNorm, no in-place ReLU with GroupNorm; medfed's counter-free BatchNorm with norm=batch
    assert ModuleValidator.validate(model, strict=False) == []
    require_dp_compatible(model, "densenet121")
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not any(k.endswith("num_batches_tracked") for k in batch.state_dict())
    with pytest.raises(ConfigError, match="densenet121.*cannot be trained with differential privacy"):
        require_dp_compatible(batch, "densenet121")


@pytest.mark.parametrize(("dims", "side"), [(2, 32), (3, 24)])
def test_opacus_per_sample_gradients_equal_per_image_autograd(dims: int, side: int) -> None:
    # Prepare: per-sample gradients through the dense blocks' concatenations, against one backward pass per image
    torch.manual_seed(0)
    model = _dense(dims, width=2)
    reference = copy.deepcopy(model)
    x, y = _input(dims, side, batch=3), torch.tensor([0, 1, 1])
    expected = []
    for image, label in zip(x, y, strict=True):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(image[None]), label[None], reduction="sum").backward()
        expected.append({n: p.grad.detach().clone() for n, p in reference.named_parameters()})

    # Execute
    private = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(private(x), y, reduction="sum").backward()

    # Assert: every layer, the stem, a dense layer inside the last block and the head included
    for name, parameter in model.named_parameters():
        grad_sample = parameter.grad_sample
        assert grad_sample.shape == (3, *parameter.shape), name
        for index in range(3):
            torch.testing.assert_close(grad_sample[index], expected[index][name], rtol=1e-4, atol=1e-6, msg=name)
    assert "encoder.denseblock4.denselayer16.layers.conv2.weight" in dict(model.named_parameters())
    private._close()


def test_builds_from_the_config_group_and_trains_one_epoch_on_volumes() -> None:
    # Prepare: a tiny 3D site, 8 volumes of 32^3
    cfg = compose_config(["model=densenet121", "model.width=4", "train.batch_size=4"])
    rng = np.random.default_rng(0)
    labels = (np.arange(8) % 2).astype(np.int64)
    images = rng.random((8, 1, 32, 32, 32), dtype=np.float32) * 0.2 + labels[:, None, None, None, None] * 0.5
    data = ArrayDataset(images=images.astype(np.float32), labels=labels)
    torch.manual_seed(0)
    model = build_task_model(cfg, spatial_dims=3, in_channels=1, n_classes=2)
    before = copy.deepcopy(model.state_dict())

    # Execute
    result = train_epochs(model, data, cfg.train, epochs=1, n_classes=2, spatial_dims=3, seed=0)

    # Assert
    assert cfg.model.name == "densenet121" and isinstance(model, DenseNet121) and model.spatial_dims == 3
    assert result.num_examples == 8 and result.steps == 2 and np.isfinite(result.loss)
    assert not torch.equal(before["encoder.conv0.weight"], model.state_dict()["encoder.conv0.weight"])


def test_ssl_takes_the_encoder_and_its_last_feature_map() -> None:
    # Prepare
    cfg = compose_config(["model=densenet121", "model.width=4", "task=ssl", "ssl.method=mim"])

    # Execute
    model = build_task_model(cfg, spatial_dims=2, in_channels=1, n_classes=2)
    x = _input(2, 64)

    # Assert: MIM reads denseblock4's output (norm5 and ReLU applied) before the global pool: 128 channels, 2x2
    assert isinstance(model, MIMModel)
    assert model.feature_map(x).shape == (2, 128, 2, 2)
    assert model(x).shape == (2,)


@pytest.mark.parametrize(("finetune", "prefixes"), [("partial", ("encoder.denseblock4.", "head.")),
                                                    ("linear_probe", ("head.",))])
def test_finetune_trains_the_last_dense_block_or_the_head(finetune: str, prefixes: tuple[str, ...]) -> None:
    model = _dense(2, finetune=finetune)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable and all(n.startswith(prefixes) for n in trainable)
    assert {p for n in trainable for p in prefixes if n.startswith(p)} == set(prefixes)
    assert "encoder.denseblock4.norm5.weight" in trainable or finetune == "linear_probe"
    assert not any(n.startswith("encoder.denseblock3.") for n in trainable)


def test_personalisation_and_grad_cam_find_their_layers() -> None:
    # Prepare
    model = _dense(3, width=2)

    # Execute
    norms = local_layer_names(model, "norm")
    head = local_layer_names(model, "head")
    maps = gradcam_maps(model, _input(3, 32).numpy())

    # Assert: every GroupNorm is local with norm; Grad-CAM explains denseblock4's activated output
    assert "encoder.norm0.weight" in norms and "encoder.denseblock4.norm5.bias" in norms
    assert len(norms) == 2 * sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert head == ["head.weight", "head.bias"]
    assert default_target_layer(model) == "encoder.denseblock4"
    assert maps.shape == (2, 32, 32, 32) and np.isfinite(maps).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"width": 0}, r"width=0 is out of range"),
    ({"norm": "layer"}, r"model.norm='layer' is not supported"),
    ({"dropout": 1.0}, r"dropout=1.0 is out of range"),
    ({"spatial_dims": 1}, r"spatial_dims=1 is not supported"),
])
def test_ill_arguments_name_the_bad_parameter(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DenseNet121(**kwargs)


@pytest.mark.parametrize(("dims", "side"), [(2, 16), (3, 12)])
def test_too_small_inputs_are_refused_with_the_minimum(dims: int, side: int) -> None:
    model = _dense(dims, width=2)
    with pytest.raises(ValueError, match=rf"spatial shape \({side}, {side}.*must be >= 17 px"):
        model(_input(dims, side))


def test_monai_key_maps_the_layout_and_refuses_others() -> None:
    assert monai_key("features.norm5.weight") == "encoder.denseblock4.norm5.weight"
    assert monai_key("features.denseblock1.denselayer1.layers.conv1.weight") == (
        "encoder.denseblock1.denselayer1.layers.conv1.weight")
    assert monai_key("class_layers.out.bias") == "head.bias"
    with pytest.raises(ValueError, match="not a key of a MONAI DenseNet"):
        monai_key("fc.weight")


def test_batch_norm_is_medfeds_federated_batch_norm() -> None:
    model = _dense(2, norm="batch")
    assert all(type(m) is FederatedBatchNorm2d for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
