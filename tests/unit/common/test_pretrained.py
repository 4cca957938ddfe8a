"""Transfer learning: medfed checkpoints, a torchvision-layout ResNet-18 built here, kernel adaptation (channels,
size, 2D -> 3D), layer errors, and which layers train under each fine-tuning mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.client.training import make_optimizer, set_lr, train_epochs
from medfed.common.config import ModelConfig, TrainConfig
from medfed.common.config.model import ResNetConfig
from medfed.common.data import ArrayDataset
from medfed.common.errors import ConfigError
from medfed.common.models import build_model, save_checkpoint, state_dict_to_numpy
from medfed.common.models.pretrained import adapt_kernel, load_pretrained, read_state_dict


class _TVBlock(nn.Module):
    """torchvision's BasicBlock layout (names and shapes), BatchNorm included."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _TVResNet18(nn.Module):
    """The parameter layout of torchvision.models.resnet18() (ImageNet: 3 channels, 7x7 stem, 1000 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for stage, cout in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if stage == 1 else 2
            setattr(self, f"layer{stage}", nn.Sequential(_TVBlock(cin, cout, stride), _TVBlock(cout, cout, 1)))
            cin = cout
        self.fc = nn.Linear(512, 1000)


def _torchvision_file(tmp_path) -> tuple[dict[str, torch.Tensor], object]:
    torch.manual_seed(1)
    tv = _TVResNet18()
    with torch.no_grad():
        for module in tv.modules():
            if isinstance(module, nn.BatchNorm2d):  # as if trained: non-trivial affine and statistics
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(tv.state_dict(), path)
    return tv.state_dict(), path


def _model(name: str = "resnet18", width: int = 64, dims: int = 2, channels: int = 1, finetune: str = "full",
           norm: str = "group"):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, width=width, finetune=finetune, norm=norm), spatial_dims=dims,
                       in_channels=channels, n_classes=2)


def test_a_medfed_checkpoint_round_trips(tmp_path):
    source = _model("smallcnn", width=8)
    save_checkpoint(tmp_path / "model.pt", state_dict_to_numpy(source), {"round": 3})
    target = _model("smallcnn", width=8)
    with torch.no_grad():
        target.head.weight.add_(1.0)

    report = load_pretrained(target, tmp_path / "model.pt")

    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(),
                                                  strict=True))
    assert report.missing == [] and report.adapted == {}


def test_a_torchvision_resnet18_state_dict_loads_with_adaptations(tmp_path):
    # Prepare
    tv, path = _torchvision_file(tmp_path)
    model = _model()
    head_before = model.head.weight.detach().clone()

    # Execute
    report = load_pretrained(model, path)

    # Assert: convolutions and BatchNorm affines carried over under medfed's names
    state = model.state_dict()
    assert torch.equal(state["encoder.layer1.0.conv1.weight"], tv["layer1.0.conv1.weight"])
    assert torch.equal(state["encoder.layer3.0.downsample.conv.weight"], tv["layer3.0.downsample.0.weight"])
    assert torch.equal(state["encoder.layer2.1.norm2.weight"], tv["layer2.1.bn2.weight"])
    assert torch.equal(state["encoder.stem.norm.bias"], tv["bn1.bias"])
    # the stem: RGB summed to grey, 7x7 resized to 3x3 keeping each filter's sum
    stem = state["encoder.stem.conv.weight"]
    assert stem.shape == (64, 1, 3, 3)
    assert torch.allclose(stem.sum(dim=(1, 2, 3)), tv["conv1.weight"].sum(dim=(1, 2, 3)), atol=1e-4)
    assert "RGB->grey" in report.adapted["encoder.stem.conv.weight"]
    # BatchNorm statistics and the 1000-class head are left out; the task's head stays as initialised
    assert "layer1.0.bn1.running_mean" in report.skipped and "head.weight" in report.skipped
    assert torch.equal(model.head.weight, head_before)
    assert report.missing == ["head.bias", "head.weight"]
    logits = model(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def _imagenet_stem_model(*, channels: int, dims: int = 2, n_classes: int = 2):
    torch.manual_seed(0)
    return build_model(ResNetConfig(width=64, stem="imagenet"), spatial_dims=dims, in_channels=channels,
                       n_classes=n_classes)


def test_the_imagenet_stem_has_torchvisions_layout():
    model = _imagenet_stem_model(channels=3, n_classes=1000)
    tv = _TVResNet18()

    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tv.parameters())
    assert model.state_dict()["encoder.stem.conv.weight"].shape == tv.conv1.weight.shape == (64, 3, 7, 7)


def test_the_imagenet_stem_takes_torchvisions_7x7_kernel_as_is(tmp_path):
    # Prepare
    tv, path = _torchvision_file(tmp_path)
    model = _imagenet_stem_model(channels=3, n_classes=1000)

    # Execute
    report = load_pretrained(model, path)

    # Assert: every layer has the file's shape; nothing adapted, the stem kernel bit for bit, and the 1000-class head
    state = model.state_dict()
    assert torch.equal(state["encoder.stem.conv.weight"], tv["conv1.weight"])
    assert torch.equal(state["encoder.stem.norm.weight"], tv["bn1.weight"])
    assert torch.equal(state["head.weight"], tv["fc.weight"])
    assert report.adapted == {} and report.missing == []
    logits = model(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("channels", "dims", "shape", "how"), [
    (1, 2, (64, 1, 7, 7), "RGB->grey (summed)"),
    (3, 3, (64, 3, 7, 7, 7), "2D->3D (inflated over 7)"),
])
def test_the_imagenet_stem_adapts_channels_and_depth_but_never_resizes(tmp_path, channels, dims, shape, how):
    tv, path = _torchvision_file(tmp_path)
    model = _imagenet_stem_model(channels=channels, dims=dims)

    report = load_pretrained(model, path)

    stem = model.state_dict()["encoder.stem.conv.weight"]
    assert stem.shape == shape
    assert report.adapted["encoder.stem.conv.weight"] == how  # no "resized"
    expected = tv["conv1.weight"].sum(dim=1, keepdim=True) if channels == 1 else tv["conv1.weight"]
    assert torch.allclose(stem.sum(dim=2) if dims == 3 else stem, expected, atol=1e-6)


def test_the_small_stem_report_names_the_imagenet_stem(tmp_path):
    _, path = _torchvision_file(tmp_path)

    report = load_pretrained(_model(), path)

    note = report.adapted["encoder.stem.conv.weight"]
    assert "kernel (7, 7)->(3, 3) (resized, sums kept)" in note and "model.stem=imagenet loads" in note


def test_a_batch_norm_model_takes_the_running_statistics_too(tmp_path):
    tv, path = _torchvision_file(tmp_path)
    model = _model(norm="batch")

    report = load_pretrained(model, path)

    state = model.state_dict()
    assert torch.equal(state["encoder.stem.norm.running_var"], tv["bn1.running_var"])
    assert torch.equal(state["encoder.layer2.1.norm2.running_mean"], tv["layer2.1.bn2.running_mean"])
    assert "encoder.layer1.0.norm1.running_var" in report.loaded
    assert "layer1.0.bn1.num_batches_tracked" in report.skipped  # the counter medfed's BatchNorm does without
    assert report.missing == ["head.bias", "head.weight"]


def test_a_shape_mismatch_names_the_layers(tmp_path):
    _, path = _torchvision_file(tmp_path)

    with pytest.raises(ConfigError, match=r"encoder\.layer1\.0\.conv1\.weight: file \(64, 64, 3, 3\), model "
                                          r"\(32, 32, 3, 3\).*model\.width"):
        load_pretrained(_model(width=32), path)
    with pytest.raises(ConfigError, match="no layer this model has"):
        torch.save({"x.weight": torch.zeros(3)}, tmp_path / "other.pt")
        load_pretrained(_model(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pt")


def test_kernel_adaptation_keeps_the_response():
    torch.manual_seed(0)
    rgb = torch.randn(4, 3, 3, 3)
    grey_image = torch.rand(1, 1, 8, 8)

    grey, how = adapt_kernel(rgb, torch.Size((4, 1, 3, 3)))
    inflated, how_3d = adapt_kernel(rgb, torch.Size((4, 3, 3, 3, 3)))

    # a grey image seen as R=G=B gives the RGB kernel's response
    expected = torch.nn.functional.conv2d(grey_image.repeat(1, 3, 1, 1), rgb, padding=1)
    assert torch.allclose(torch.nn.functional.conv2d(grey_image, grey, padding=1), expected, atol=1e-5)
    # inflated over depth 3: the depth slices sum to the 2D kernel (a volume of identical slices: same response)
    assert torch.allclose(inflated.sum(dim=2), rgb, atol=1e-6)
    assert "RGB->grey" in how and "2D->3D" in how_3d
    assert adapt_kernel(rgb, torch.Size((5, 3, 3, 3))) is None  # other output channels cannot be bridged


def test_a_2d_checkpoint_starts_a_3d_model(tmp_path):
    source = _model("smallcnn", width=8)
    save_checkpoint(tmp_path / "2d.pt", state_dict_to_numpy(source), {})
    volume_model = _model("smallcnn", width=8, dims=3)

    report = load_pretrained(volume_model, tmp_path / "2d.pt")

    assert volume_model.state_dict()["encoder.block1_1.conv.weight"].shape == (8, 1, 3, 3, 3)
    assert all("2D->3D" in how for how in report.adapted.values()) and len(report.adapted) >= 3


@pytest.mark.parametrize(("mode", "trainable"), [
    ("linear_probe", {"head"}),
    ("partial", {"head", "encoder.block3_1"}),
    ("full", {"head", "encoder.block1_1", "encoder.block2_1", "encoder.block2_2", "encoder.block3_1"}),
])
def test_finetune_modes_train_only_their_layers(mode, trainable):
    model = _model("smallcnn", width=8, finetune=mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((32, 1, 16, 16)).astype(np.float32), rng.integers(0, 2, 32))

    train_epochs(model, data, TrainConfig(batch_size=16), epochs=1, n_classes=2, spatial_dims=2, seed=0,
                 device=torch.device("cpu"))

    changed = {"head" if k.startswith("head") else ".".join(k.split(".")[:2])  # head, or encoder.<stage>
               for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


def test_the_encoder_can_learn_slower_than_the_head():
    model = _model("smallcnn", width=8)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2, encoder_lr_scale=0.1))

    set_lr(optimizer, 0.02)  # a round's scheduled rate keeps the ratio

    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == pytest.approx([0.002, 0.02])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        TrainConfig(encoder_lr_scale=0.0)
    with pytest.raises(ConfigError, match="model.finetune"):
        ModelConfig(finetune="everything")


def test_dp_training_keeps_frozen_layers_frozen():
    from medfed.client.training import DPTraining

    model = _model("smallcnn", width=8, finetune="partial")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((64, 1, 16, 16)).astype(np.float32), rng.integers(0, 2, 64))

    result = train_epochs(model, data, TrainConfig(batch_size=16), epochs=1, n_classes=2, spatial_dims=2, seed=0,
                          device=torch.device("cpu"),
                          privacy=DPTraining(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=16,
                                             grad_sample_mode="hooks", secure_mode=False))

    changed = {"head" if k.startswith("head") else k.split(".")[1]
               for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert result.steps > 0 and changed == {"head", "block3_1"}


def _hub_file(tmp_path, name="weights.pth"):
    """A torchvision-layout ResNet-18 saved as a 'hub' file; returns (path, its SHA-256)."""
    import hashlib

    source = tmp_path / "hub" / name
    source.parent.mkdir(exist_ok=True)
    torch.save(_TVResNet18().state_dict(), source)
    return source, hashlib.sha256(source.read_bytes()).hexdigest()


def test_fetch_downloads_checks_the_hash_in_the_name_and_reuses_the_file(tmp_path):
    from medfed.common.models.hub import fetch_weights

    plain, digest = _hub_file(tmp_path)
    named = plain.rename(plain.with_name(f"resnet18-{digest[:8]}.pth"))

    path = fetch_weights(named.as_uri(), tmp_path / "weights")

    assert path == tmp_path / "weights" / named.name and path.read_bytes() == named.read_bytes()
    model = build_model(ModelConfig(name="resnet18", width=64), spatial_dims=2, in_channels=1, n_classes=2)
    assert load_pretrained(model, path).loaded  # the fetched file starts a run
    named.unlink()  # a second fetch does not go online: the file is already here
    assert fetch_weights(named.as_uri(), tmp_path / "weights") == path


def test_fetch_refuses_a_file_whose_hash_does_not_match_its_name(tmp_path):
    from medfed.common.models.hub import fetch_weights

    plain, digest = _hub_file(tmp_path)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    named = plain.rename(plain.with_name(f"resnet18-{wrong}.pth"))

    with pytest.raises(ConfigError, match="SHA-256 prefix"):
        fetch_weights(named.as_uri(), tmp_path / "weights")
    assert not any((tmp_path / "weights").iterdir())  # nothing half-fetched is left


def test_fetch_offline_says_how_to_bring_the_file_in(tmp_path):
    from medfed.common.models.hub import fetch_weights

    with pytest.raises(ConfigError, match=r"Offline\?.*model.pretrained=/path/to/resnet18.pth"):
        fetch_weights("http://127.0.0.1:9/models/resnet18.pth", tmp_path / "weights", timeout_s=5)
    with pytest.raises(ConfigError, match="neither a known weights name"):
        fetch_weights("resnet18", tmp_path / "weights")
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not torch weights")
    with pytest.raises(ConfigError, match="cannot be read as torch weights"):
        fetch_weights(not_weights.as_uri(), tmp_path / "weights")
    assert not (tmp_path / "weights" / "notes.pth").exists()


def test_known_names_are_hub_urls_with_their_hash():
    from medfed.common.models.hub import KNOWN_WEIGHTS, resolve_weights_url

    assert resolve_weights_url("torchvision:resnet18") == KNOWN_WEIGHTS["torchvision:resnet18"]
    assert all(url.startswith("https://") and _hash_named(url) for url in KNOWN_WEIGHTS.values())


def _hash_named(url: str) -> bool:
    import re

    return re.search(r"-[0-9a-f]{8}\.pth$", url) is not None
