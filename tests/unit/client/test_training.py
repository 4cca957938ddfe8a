"""The training core (no Flower): sample counts, class weights, the round's learning rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.client.training import class_weights, make_optimizer, round_work, train_epochs
from medfed.common.config import compose_config
from medfed.common.errors import ConfigError
from medfed.common.data import ArrayDataset
from medfed.common.models import build_model


def _data(n: int = 70) -> ArrayDataset:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.2 + labels[:, None, None, None] * 0.5
    return ArrayDataset(images=images.astype(np.float32), labels=labels)


def test_num_examples_counts_samples_not_batches_and_loss_drops():
    # Prepare
    cfg = compose_config(["train.batch_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)

    # Execute
    first = train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=1)
    later = train_epochs(model, _data(), cfg.train, epochs=3, n_classes=2, spatial_dims=2, seed=2)

    # Assert
    assert first.num_examples == 70 and first.steps == 3  # 3 batches of up to 32, but 70 samples
    assert later.loss < first.loss


def test_default_recipe_gives_sites_of_4_and_400_images_the_same_local_steps():
    # Prepare: the default recipe counts a round's work in optimizer steps (here 7 of them, to stay quick)
    default = compose_config([]).train
    assert default.local_epochs == 0 and default.local_steps > 0
    cfg = compose_config(["train.local_steps=7"]).train

    # Execute
    steps = {}
    for n in (4, 400):
        model = build_model(compose_config([]).model, spatial_dims=2, in_channels=1, n_classes=2)
        steps[n] = train_epochs(model, _data(n), cfg, **round_work(cfg, 1), n_classes=2, spatial_dims=2,
                                seed=0).steps
    by_epoch = compose_config(["train.local_epochs=1"]).train
    model = build_model(compose_config([]).model, spatial_dims=2, in_channels=1, n_classes=2)
    one_pass = train_epochs(model, _data(400), by_epoch, **round_work(by_epoch, 1), n_classes=2, spatial_dims=2,
                            seed=0).steps

    # Assert: equal work at both sites; counted in epochs, the large site takes 13 steps (ceil(400 / 32))
    assert steps == {4: 7, 400: 7}
    assert one_pass == 13
    assert round_work(cfg, 1, sites=5)["steps"] == 35  # the centralized baseline: all five hospitals' steps


def test_warm_up_ramps_the_rate_step_by_step_over_the_first_rounds():
    cfg = compose_config(["train.rounds=4", "train.warmup_rounds=2", "train.lr=0.01"]).train
    assert cfg.step_lr(1, 0.5) == pytest.approx(0.01 * 0.25)
    assert cfg.step_lr(2, 0.5) == pytest.approx(0.01 * 0.75)
    assert cfg.step_lr(3, 0.1) == pytest.approx(0.01)
    no_warm_up = compose_config(["train.warmup_rounds=0", "train.lr=0.01"]).train
    assert no_warm_up.step_lr(1, 0.1) == pytest.approx(0.01)

    # the rate reaches the optimizer at every step: the last step of round 1 (warm-up of one round) has the full rate
    seen: list[float] = []
    one = compose_config(["train.local_steps=4", "train.warmup_rounds=1", "train.lr=0.01"]).train
    model = build_model(compose_config([]).model, spatial_dims=2, in_channels=1, n_classes=2)
    optimizer = make_optimizer(model, one)
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    train_epochs(model, _data(), one, **round_work(one, 1), n_classes=2, spatial_dims=2, seed=0, optimizer=optimizer)
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01])


@pytest.mark.parametrize(("overrides", "named"), [
    (["train.local_steps=0"], "train.local_epochs=N"),
    (["train.local_steps=-3"], "train.local_steps=-3"),
    (["train.rounds=3", "train.warmup_rounds=4"], "train.warmup_rounds=4"),
    (["privacy=dp", "train.local_steps=10"], "train.local_epochs=N instead"),
])
def test_local_work_values_are_refused_with_the_fix(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose_config(overrides)


def test_dp_sgd_counts_local_work_in_epochs():
    assert compose_config(["privacy=dp"]).train.local_epochs == 1
    assert compose_config(["privacy=dp", "train.local_epochs=3"]).train.local_epochs == 3
    assert compose_config(["privacy=central_dp"]).train.local_epochs == 0  # (server-side noise: local steps as usual)


def test_balanced_class_weights_by_hand():
    # counts 3 and 1 of 4: weights 4 / (2 * 3) and 4 / (2 * 1)
    weights = class_weights(np.array([0, 0, 0, 1]), 3, "balanced")
    np.testing.assert_allclose(weights.numpy(), [4 / 6, 2.0, 1.0], rtol=1e-6)
    assert class_weights(np.array([0, 1]), 2, "none") is None


def test_round_learning_rate_reaches_the_optimizer():
    # Prepare
    cfg = compose_config(["train.lr_schedule=cosine", "train.rounds=4"])
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    optimizer = make_optimizer(model, cfg.train)

    # Execute
    train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=0,
                 lr=cfg.train.round_lr(4), optimizer=optimizer)

    # Assert
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * cfg.train.lr_min_factor)


def test_same_seed_same_weights():
    cfg = compose_config([])
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
        train_epochs(model, _data(), cfg.train, epochs=1, n_classes=2, spatial_dims=2, seed=5)
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_dp_batches_are_fetched_whole_and_may_be_empty():
    # DP-SGD's Poisson sampling fetches a batch's indices at once, and may draw an empty batch
    from medfed.client.training import _BatchedTensors

    images = np.arange(4 * 1 * 2 * 2, dtype=np.float32).reshape(4, 1, 2, 2)
    data = _BatchedTensors(ArrayDataset(images=images, labels=np.array([0, 1, 0, 1])))

    x, y = data.__getitems__([2, 0])
    empty_x, empty_y = data.__getitems__([])

    np.testing.assert_array_equal(x.numpy(), images[[2, 0]])
    assert y.tolist() == [0, 0]
    assert tuple(empty_x.shape) == (0, 1, 2, 2) and tuple(empty_y.shape) == (0,)


@pytest.mark.parametrize(("private", "augment"), [(False, False), (True, False), (False, True), (True, True)],
                         ids=["sgd", "dp-sgd", "sgd-augmented", "dp-sgd-augmented"])
def test_loader_workers_and_pinned_memory_train_the_same_weights(tmp_path, private, augment):
    # Prepare: the images in memory, then on the site's disk (ImageFiles) read ahead by a worker process
    from medfed.client.training import DPTraining
    from medfed.common.data.image_files import ImageFiles

    data = _data(40)
    (tmp_path / "decoded").mkdir()
    for index, image in enumerate(data.images):
        np.save(tmp_path / "decoded" / f"i{index}.npy", image)
    on_disk = ArrayDataset(images=ImageFiles(tmp_path / "decoded", np.array([f"i{i}" for i in range(40)]),  # type: ignore[arg-type]
                                             (1, 28, 28), np.float32), labels=data.labels)
    privacy = DPTraining(noise_multiplier=0.5, max_grad_norm=1.0) if private else None
    weights = []
    for options in (["train.loader_workers=0"], ["train.loader_workers=1", "train.pin_memory=true"]):
        cfg = compose_config(["train.batch_size=16", f"train.augment.enabled={augment}", *options])
        torch.manual_seed(0)
        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)

        # Execute
        source = data if options == ["train.loader_workers=0"] else on_disk
        result = train_epochs(model, source, cfg.train, epochs=2, n_classes=2, spatial_dims=2, seed=3,
                              privacy=privacy)
        weights.append([p.detach().clone() for p in model.parameters()])
        assert result.num_examples == 40

    # Assert: the batches' membership and order, and their augmentation (drawn on the loaded batch), depend neither
    # on where the images are nor on how they are read
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_augmentation_is_drawn_at_every_step_and_seeded(private):
    # Prepare
    from medfed.client.training import DPTraining

    privacy = DPTraining(noise_multiplier=0.5, max_grad_norm=1.0) if private else None

    def trained(augment: bool, seed: int) -> torch.Tensor:
        cfg = compose_config(["train.batch_size=16", f"train.augment.enabled={augment}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
        train_epochs(model, _data(40), cfg.train, epochs=2, n_classes=2, spatial_dims=2, seed=seed, privacy=privacy)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    # Execute
    plain, augmented, again, other_seed = trained(False, 3), trained(True, 3), trained(True, 3), trained(True, 4)

    # Assert
    assert not torch.equal(plain, augmented)  # the augmentation reached the training steps
    assert torch.equal(augmented, again)
    assert not torch.equal(augmented, other_seed)
