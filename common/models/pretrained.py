"""Start a model from pretrained weights: medfed checkpoints (a run's model, an SSL encoder) and torchvision-,
timm- or MONAI-layout ResNet state dicts.

What is adapted, and what it costs:

- **Key layout**: torchvision/MONAI/timm ResNet names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
  ``layer1.0.downsample.0/1``, ``fc``) map onto medfed's ``resnet18`` (``encoder.stem.conv``, ``encoder.stem.norm``,
  ``encoder.layer1.0.conv1``, ``encoder.layer1.0.norm1``, ``...downsample.conv/norm``, ``head``). A ``state_dict``,
  ``model`` or ``module.``-prefixed wrapper is unwrapped.
- **BatchNorm -> GroupNorm**: medfed's networks use GroupNorm by default (Opacus needs per-sample independence), so
  a BatchNorm's affine ``weight``/``bias`` become the GroupNorm's and its running mean/variance are dropped (GroupNorm
  normalises each image by its own statistics). A ``model.norm=batch`` network (runs without DP) takes the running
  statistics too. The features shift: measured on PneumoniaMNIST (benchmarks/norm_transfer.py),
  the swap alone costs 0.150 test AUC (0.963 -> 0.813), and one epoch of fine-tuning recovers most of it (0.953
  vs 0.877 from scratch; 0.926 vs 0.912 under DP-SGD at epsilon 8).
- **Stem kernel**: a ``resnet18`` with ``model.stem=imagenet`` has torchvision's stem (7x7 stride 2, 3x3 max
  pool), so the 7x7 kernel loads as is: no resizing (only the channel and 2D -> 3D rules below apply). The small stem
  (``model.stem=small``, and ``auto`` unless the model is built knowing its images are >= 128 px) is a 3x3 stride-1
  convolution that keeps small images' resolution; the 7x7 kernel is resized to 3x3 for it (area interpolation,
  scaled to keep each filter's sum), which changes what the first layer sees, and the report says so. Use
  ``model.stem=imagenet`` for ImageNet weights on images of 128 px or more (the 224 px they were trained at).
- **Channels**: 3 -> 1 input channels sums the RGB kernels (a grey image seen as R=G=B gives the same response);
  1 -> 3 repeats the kernel divided by 3.
- **2D -> 3D**: a 2D kernel is inflated to 3D by repeating it along depth divided by the depth (I3D), so a volume of
  identical slices gives the 2D response.
- **Head**: a pretrained classifier whose shape does not fit the task is left out (the new head keeps its random
  initialisation); every other layer must fit, or the error names each mismatched layer with both shapes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medfed.common.errors import ConfigError

__all__ = ["PretrainedReport", "adapt_kernel", "load_pretrained", "read_state_dict", "torchvision_to_medfed"]

logger = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "model_state_dict", "encoder_state_dict")


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did: layers loaded (and how adapted), left out, and kept at initialisation."""

    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # in the file, not used (BatchNorm statistics, unfit head)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (kept at initialisation)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a medfed checkpoint, a plain state dict, or one wrapped under ``state_dict``
    / ``model``; a ``module.`` prefix (DataParallel) is removed.

    Raises:
        ConfigError: no such file, or not a readable weights file (named, with what was found).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained={str(path)!r} does not exist. Give a local weights file (a medfed checkpoint, or a "
            "torchvision/MONAI/timm ResNet state dict saved with torch.save). Runs never download; fetch hub weights "
            "first with `medfed weights fetch torchvision:resnet18` (or any URL) and pass the file it prints."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(
            f"model.pretrained={path.name!r} cannot be read as torch weights ({type(exc).__name__}); save weights "
            "with torch.save(model.state_dict(), path)."
        ) from None
    for key in _WRAPPERS:
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not isinstance(payload, Mapping) or not payload or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise ConfigError(f"model.pretrained={path.name!r} holds no state dict of tensors.")
    return {re.sub(r"^module\.", "", str(k)): v for k, v in payload.items()}


_TORCHVISION_BN = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def torchvision_to_medfed(
    state: Mapping[str, torch.Tensor], *, keep_statistics: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision/MONAI/timm ResNet names -> medfed ``resnet18`` names; BatchNorm running statistics are dropped
    unless ``keep_statistics`` (a ``model.norm=batch`` target has them; the batch counter is always dropped).

    Returns the renamed tensors and the names left out.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    kept = {"weight", "bias"} | ({"running_mean", "running_var"} if keep_statistics else set())
    for key, value in state.items():
        name = key
        name = re.sub(r"^conv1\.", "encoder.stem.conv.", name)
        name = re.sub(r"^bn1\.", "encoder.stem.norm.", name)
        name = re.sub(r"^(layer\d)\.(\d+)\.bn(\d)\.", r"encoder.\1.\2.norm\3.", name)
        name = re.sub(r"^(layer\d)\.(\d+)\.conv(\d)\.", r"encoder.\1.\2.conv\3.", name)
        name = re.sub(r"^(layer\d)\.(\d+)\.downsample\.0\.", r"encoder.\1.\2.downsample.conv.", name)
        name = re.sub(r"^(layer\d)\.(\d+)\.downsample\.1\.", r"encoder.\1.\2.downsample.norm.", name)
        name = re.sub(r"^fc\.", "head.", name)
        if ".norm" in name and name.rsplit(".", 1)[1] in _TORCHVISION_BN - kept:
            dropped.append(key)  # BatchNorm running statistics: GroupNorm has none
            continue
        if name == key and not key.startswith(("encoder.", "head.")):
            dropped.append(key)
            continue
        out[name] = value
    return out, dropped


def adapt_kernel(weight: torch.Tensor, target: torch.Size) -> tuple[torch.Tensor, str] | None:
    """Adapt a convolution kernel to ``target`` (input channels 3 <-> 1, kernel size, 2D -> 3D); None when the
    shapes cannot be bridged (different output channels, or a change these rules do not cover)."""
    w = weight.detach().float()
    steps: list[str] = []
    if w.dim() not in (4, 5) or len(target) not in (4, 5) or w.shape[0] != target[0]:
        return None
    if w.shape[1] != target[1]:
        if w.shape[1] == 3 and target[1] == 1:
            w = w.sum(dim=1, keepdim=True)
            steps.append("RGB->grey (summed)")
        elif w.shape[1] == 1 and target[1] == 3:
            w = w.repeat(1, 3, *([1] * (w.dim() - 2))) / 3.0
            steps.append("grey->RGB (repeated /3)")
        else:
            return None
    if w.dim() == 4 and len(target) == 5:
        depth = target[2]
        w = w.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
        steps.append(f"2D->3D (inflated over {depth})")
    if w.dim() != len(target):
        return None
    if tuple(w.shape[2:]) != tuple(target[2:]):
        sums = w.sum(dim=tuple(range(2, w.dim())), keepdim=True)
        mode = "area" if all(s >= t for s, t in zip(w.shape[2:], target[2:], strict=True)) else (
            "bilinear" if w.dim() == 4 else "trilinear")
        kwargs = {} if mode == "area" else {"align_corners": False}
        resized = F.interpolate(w, size=tuple(target[2:]), mode=mode, **kwargs)
        new_sums = resized.sum(dim=tuple(range(2, w.dim())), keepdim=True)
        w = resized * torch.where(new_sums.abs() > 1e-12, sums / new_sums, torch.ones_like(sums))
        steps.append(f"kernel {tuple(weight.shape[2:])}->{tuple(target[2:])} (resized, sums kept)")
    return w.to(weight.dtype), ", ".join(steps)


_STEM_KERNEL = "encoder.stem.conv.weight"


def _stem_hint(file_kernel: tuple[int, ...], model_kernel: tuple[int, ...]) -> str:
    """What a resized stem kernel means, and the ``model.stem`` that loads the file's kernel as is."""
    if max(file_kernel) > max(model_kernel):
        return ("; the model's small stem (3x3, stride 1) differs from the file's: model.stem=imagenet loads the "
                "file's stem as is (for images of 128 px or more)")
    return "; the model's stem is larger than the file's: model.stem=small matches a small-stem checkpoint"


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Load the weights of ``path`` into ``model`` in place, adapting what can be adapted (module docstring).

    Raises:
        ConfigError: unreadable file; no layer of the file fits the model; or a layer that does not fit (each named
            with the file's and the model's shapes).
    """
    raw = read_state_dict(path)
    report = PretrainedReport()
    target = model.state_dict()
    if any(k.startswith(("encoder.", "head.")) for k in raw):
        state = dict(raw)  # a medfed checkpoint (a run's model, or an SSL encoder)
        extra = [k for k in state if not k.startswith(("encoder.", "head."))]
        report.skipped += extra  # e.g. an SSL projection or reconstruction head
        state = {k: v for k, v in state.items() if k not in extra}
    else:
        target_has_statistics = any(k.endswith(".running_mean") for k in target)
        state, dropped = torchvision_to_medfed(raw, keep_statistics=target_has_statistics)
        report.skipped += dropped
    fitted: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for name, value in state.items():
        if name not in target:
            report.skipped.append(name)
            continue
        want = target[name].shape
        if value.shape == want:
            fitted[name] = value.to(target[name].dtype)
            continue
        if name.startswith("head."):  # a classifier for other classes: the task gets a new head
            report.skipped.append(name)
            continue
        adapted = adapt_kernel(value, want) if value.dim() in (4, 5) else None
        if adapted is not None and adapted[0].shape == want:
            fitted[name], report.adapted[name] = adapted
            if name == _STEM_KERNEL and "resized" in report.adapted[name]:
                report.adapted[name] += _stem_hint(tuple(value.shape[2:]), tuple(want[2:]))
                logger.info("pretrained %s: stem kernel %s", Path(path).name, report.adapted[name])
            continue
        mismatched.append(f"{name}: file {tuple(value.shape)}, model {tuple(want)}")
    if mismatched:
        shown = "; ".join(mismatched[:8]) + (f"; ... ({len(mismatched) - 8} more)" if len(mismatched) > 8 else "")
        raise ConfigError(
            f"model.pretrained={Path(path).name!r} does not fit this model in {len(mismatched)} layer(s): {shown}. "
            "Check model.name and model.width (torchvision's ResNet-18 is model=resnet18 model.width=64, with "
            "model.stem=imagenet to keep its 7x7 stem)."
        )
    if not fitted:
        raise ConfigError(
            f"model.pretrained={Path(path).name!r} has no layer this model has (its first keys: "
            f"{', '.join(list(raw)[:4])}); is it a ResNet or a medfed checkpoint of the same model?"
        )
    model.load_state_dict(fitted, strict=False)
    report.loaded = sorted(fitted)
    report.missing = sorted(set(target) - set(fitted))
    logger.info("pretrained %s: %d layers loaded (%d adapted), %d left out, %d at initialisation",
                Path(path).name, len(report.loaded), len(report.adapted), len(report.skipped), len(report.missing))
    return report

