"""model=scatternet: the fixed scattering front end, its heads, and the config that refuses what it cannot do."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from medfed.common.config import ScatterNetConfig, compose_config
from medfed.common.errors import ConfigError
from medfed.common.models import build_model
from medfed.common.models.scatternet import ScatterNet, scatter_channels


def _model(spatial_dims: int, channels: int, head: str = "linear", n_classes: int = 3) -> ScatterNet:
    model = build_model(ScatterNetConfig(head=head), spatial_dims=spatial_dims, in_channels=channels,
                        n_classes=n_classes)
    assert isinstance(model, ScatterNet)
    return model


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "features"),
    [
        (2, (4, 1, 28, 28), (4, 81, 7, 7)),  # grey: 1 + J L + L^2 J (J-1) / 2 = 81 maps at 28 / 2^J = 7 px
        (2, (4, 3, 28, 28), (4, 243, 7, 7)),  # colour: 81 maps per channel
        (3, (2, 1, 6, 16, 16), (2, 81, 6, 4, 4)),  # volume: slice by slice along the depth axis
    ],
)
@pytest.mark.parametrize("head", ["linear", "cnn"])
def test_features_and_logits_have_the_documented_shapes(spatial_dims, shape, features, head) -> None:
    model = _model(spatial_dims, shape[1], head)
    images = torch.rand(shape)

    assert tuple(model.front_features(images).shape) == features
    assert tuple(model(images).shape) == (shape[0], 3)
    assert scatter_channels(2, 8) == 81


def test_the_front_end_is_fixed_deterministic_and_not_in_the_state_dict() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 1, 28, 28)
    one, two = _model(2, 1), _model(2, 1)

    assert torch.equal(one.front_features(images), two.front_features(images))  # no random weights
    assert set(one.state_dict()) == {"head.weight", "head.bias"}  # what a hospital sends: the head only
    assert all(p.requires_grad for p in one.parameters())


@pytest.mark.parametrize("image", ["blob", "texture"])
def test_features_are_stable_under_a_one_pixel_shift(image) -> None:
    # Prepare: a smooth blob or a random texture, and the same image one pixel to the right
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"))
    x = (torch.exp(-((grid[0] - 13) ** 2 + (grid[1] - 12) ** 2) / 18.0)[None, None] if image == "blob"
         else torch.rand(1, 1, 28, 28))
    shifted = torch.roll(x, shifts=1, dims=-1)
    model = _model(2, 1)

    # Execute
    a, b = model.front_features(x), model.front_features(shifted)

    # Assert: the features move less than the pixels do (measured: blob 0.20 vs 0.23, texture 0.48 vs 0.74)
    pixel_change = (x - shifted).norm() / x.norm()
    feature_change = (a - b).norm() / a.norm()
    assert feature_change < 0.9 * pixel_change
    assert torch.isfinite(a).all()


def test_the_cnn_head_gives_one_logit_row_per_view() -> None:
    model = _model(2, 1, "cnn", n_classes=2)
    features = model.front_features(torch.rand(5, 1, 28, 28))
    views = torch.stack([features, features.flip(-1), features], dim=1)  # (B, V, F, H, W)

    logits = model.head_views(views)

    assert tuple(logits.shape) == (5, 3, 2)
    # views do not mix: no kernel crosses them and each is normalised alone, so a view's logits are its own
    alone = model.head_views(features.flip(-1).unsqueeze(1))
    assert torch.allclose(logits[:, 1], alone[:, 0], atol=1e-5)
    assert torch.allclose(logits[:, 0], logits[:, 2], atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=scatternet", "model.head=mlp"], r"model.head='mlp' is not allowed; choose one of: linear, cnn"),
        (["model=scatternet", "model.scatter_j=5"], r"scatter_j=5 is too large for 28 px images.*<= 4"),
        (["model=scatternet", "model.pretrained=weights.pt"], r"does not take model.pretrained='weights.pt'"),
        (["model=scatternet", "model.finetune=linear_probe"], r"does not take model.finetune='linear_probe'"),
        (["model=scatternet", "model.norm=batch"], r"does not take model.norm='batch'"),
        (["model=scatternet", "task=ssl"], r"task=ssl cannot pretrain model=scatternet"),
        (["model=scatternet", "evaluate.gradcam_samples=2"], r"gradcam_samples needs a convolutional encoder"),
        (["model=smallcnn", "model.head=linear"], r"'model.head' is not a key"),
        (["model=smallcnn", "train.aug_views=4"], r"train.aug_views=4 needs a model whose features are fixed"),
        (["model=scatternet", "model.head=cnn", "train.aug_views=2", "dataset=synthetic",
          "dataset.spatial_dims=3"], r"not supported for volumes with model.head=cnn"),
    ],
)
def test_what_scatternet_cannot_do_is_refused_at_config_time(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_privacy_dp_picks_the_head_recipe_and_explicit_overrides_win() -> None:
    plain = compose_config(["model=scatternet"])
    private = compose_config(["model=scatternet", "privacy=dp"])
    chosen = compose_config(["model=scatternet", "privacy=dp", "train.lr=0.3", "train.rounds=7"])

    assert plain.train == compose_config([]).train  # without DP the recipe is the default one
    assert (private.train.optimizer, private.train.batch_size, private.train.weight_decay) == ("sgd", 256, 0.0)
    assert (chosen.train.lr, chosen.train.rounds) == (0.3, 7)
    assert dataclasses.replace(chosen.train, lr=private.train.lr, rounds=private.train.rounds) == private.train
