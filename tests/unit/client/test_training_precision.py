"""Mixed precision in the training core: bfloat16 autocast on a CPU, float32 unchanged, none under DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medfed.client.training import DPTraining, select_device, train_epochs
from medfed.common.config import TrainConfig, compose_config
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError
from medfed.common.models import build_model


def _data(n: int = 70) -> ArrayDataset:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.2 + labels[:, None, None, None] * 0.5
    return ArrayDataset(images=images.astype(np.float32), labels=labels)


def _conv_output_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


def test_bf16_autocast_trains_one_epoch_of_smallcnn_on_cpu():
    # Prepare
    cfg = compose_config(["model=smallcnn", "train.amp=bf16", "train.batch_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = _conv_output_dtypes(model)

    # Execute
    result = train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=1,
                          device=torch.device("cpu"))

    # Assert: the forward ran in bfloat16, the weights stay float32 and moved
    assert dtypes == [torch.bfloat16] * 3 and result.steps == 3
    assert math.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_float32_on_cpu_is_the_plain_step(amp):
    # Prepare: train.amp=auto on a CPU is off; both give the same weights as a recipe without the key
    runs = []
    for setting in (amp, None):
        cfg = compose_config([f"train.amp={setting}"] if setting else [])
        torch.manual_seed(0)
        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
        dtypes = _conv_output_dtypes(model)

        # Execute
        train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=5)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

        # Assert
        assert set(dtypes) == {torch.float32}
    assert torch.equal(runs[0], runs[1])


def test_explicit_amp_under_dp_is_refused_in_the_training_core():
    # a TrainConfig built without the config's rules (as a caller of the core may): the core refuses too
    model = build_model(compose_config([]).model, spatial_dims=2, in_channels=1, n_classes=2)
    with pytest.raises(ConfigError, match="cannot train under DP-SGD"):
        train_epochs(model, _data(), TrainConfig(amp="bf16"), epochs=1, n_classes=2, spatial_dims=2, seed=0,
                     privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0))
    assert not any(m._forward_hooks for m in model.modules())  # refused before Opacus wrapped the model


def test_select_device_takes_the_recipe_spec():
    assert select_device() == select_device("auto")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device='gpu' is not a device"):
        select_device("gpu")
