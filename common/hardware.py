"""A site's hardware: the device it trains on, in which precision, and whether a model fits its memory.

The hospital chooses its device (``device`` in its site config; ``train.device`` in the recipe and in simulation):
``auto`` (its GPU when torch sees one, else its CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:func:`resolve_device`).

Mixed precision (``train.amp``, :func:`amp_dtype`): ``auto`` trains in bfloat16 (float16 on GPUs without bfloat16)
on a GPU without DP, and in float32 on a CPU and under DP. DP-SGD refuses an explicit ``bf16``/``fp16``: Opacus
computes every image's gradient from hooks on the activations and the gradients flowing back; under autocast both
come in reduced precision, so the per-sample norms it clips to ``max_grad_norm`` are inexact and the sensitivity
the epsilon rests on no longer holds exactly (:data:`~medfed.common.config.rules.AMP_UNDER_DP`). float16 needs a
``torch.amp.GradScaler`` (its range underflows small gradients); bfloat16 has float32's range and needs none.

Memory preflight (:func:`estimate_training_memory`, :func:`require_fits`): before round 1 a site estimates what
training the model needs (parameters, gradients, optimizer state, activations measured by a forward pass on
torch's ``meta`` device, per-sample gradients under DP) and refuses when its device cannot hold it.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from medfed.common.config.checks import require_device_spec
from medfed.common.config.rules import AMP_UNDER_DP
from medfed.common.errors import ConfigError

if TYPE_CHECKING:
    from medfed.common.config import Config

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "GIB",
    "SAFETY_FACTOR",
    "MemoryEstimate",
    "amp_dtype",
    "available_memory",
    "configure_backend",
    "estimate_for_config",
    "estimate_training_memory",
    "fit_problem",
    "needs_grad_scaler",
    "require_fits",
    "resolve_device",
    "use_channels_last",
]

logger = logging.getLogger(__name__)

GIB = 2**30
# The margin over the sum of the parts a device must offer (measured accuracy: estimate_training_memory's docstring)
SAFETY_FACTOR = 1.25
# A CUDA context (kernels, cuDNN/cuBLAS workspaces) takes this much of a GPU's memory outside torch's tensors
CUDA_CONTEXT_BYTES = 768 * 2**20
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")
_FLOAT_BYTES = 4


def _cuda_unavailable_reason() -> str:
    built = torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} is built for CPU only"
    return f"torch {torch.__version__} is built for CUDA {built}, but finds no GPU or no working driver"


def resolve_device(spec: str = "auto", *, key: str = "train.device") -> torch.device:
    """The device ``spec`` names: ``auto`` (cuda when torch sees a GPU, else cpu), ``cpu``, ``cuda``, ``cuda:N``.

    ``key`` is where the spec came from (``train.device``, or ``device`` of a site config), named in the errors.

    Raises:
        ConfigError: a spec of another form, CUDA asked on a machine where torch has none, an index out of range.
    """
    require_device_spec(key, spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={spec!r} but this machine has no CUDA device torch can use (torch.cuda.is_available() is False: "
            f"{_cuda_unavailable_reason()}); set {key} to auto or cpu (auto trains on a GPU when there is one)."
        )
    found = _CUDA_INDEX.match(spec)
    if found is None:
        return torch.device("cuda")
    index, count = int(found.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{key}={spec!r} but torch sees {count} CUDA device(s), numbered cuda:0..cuda:{count - 1} (after "
            f"CUDA_VISIBLE_DEVICES); set {key} to one of them, or to cuda (the current one) or auto."
        )
    return torch.device("cuda", index)


def amp_dtype(amp: str, device: torch.device, dp: bool) -> torch.dtype | None:
    """The autocast dtype of training under ``train.amp`` on ``device`` (None: float32, no autocast).

    ``auto``: bfloat16 on a GPU that supports it, else float16, for training without DP; float32 on a CPU and under
    DP. ``off``: float32. ``bf16``: on a GPU with bfloat16 or on a CPU (torch's CPU autocast computes in bfloat16).
    ``fp16``: on a GPU only.

    Raises:
        ConfigError: ``bf16``/``fp16`` under DP (``dp``: Opacus DP-SGD), ``fp16`` on a CPU, ``bf16`` on a GPU
            without bfloat16, any other value.
    """
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError(f"train.amp={amp!r} is not allowed; choose one of: auto, off, bf16, fp16.")
    cuda = device.type == "cuda"
    if amp == "off" or (amp == "auto" and (dp or not cuda)):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dp:
        raise ConfigError(f"train.amp={amp} cannot train under DP-SGD: {AMP_UNDER_DP} Use train.amp=auto or off.")
    if amp == "fp16" and not cuda:
        raise ConfigError(
            f"train.amp=fp16 on {device}: torch's CPU autocast is for bfloat16 (float16 kernels on a CPU are slow or "
            "missing, and float16's narrow range needs a GradScaler made for GPUs). Use train.amp=bf16 or off on a "
            "CPU, or train on a GPU."
        )
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.amp=bf16 on {device}: this GPU has no bfloat16 support (it came with NVIDIA "
                          "Ampere); use train.amp=fp16 or auto.")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 needs loss scaling (small gradients underflow its range); bfloat16 and float32 do not."""
    return dtype == torch.float16


def configure_backend(device: torch.device, cudnn_benchmark: bool) -> None:
    """On a GPU, let cuDNN pick the fastest convolution algorithms for the shapes it meets (``cudnn_benchmark``:
    a search at each new shape, then faster steps; results may differ in the last bits between runs)."""
    if device.type == "cuda" and torch.backends.cudnn.benchmark != cudnn_benchmark:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def use_channels_last(device: torch.device, spatial_dims: int) -> bool:
    """Whether 2D convolutions run in channels-last memory format (faster on GPUs with tensor cores)."""
    return device.type == "cuda" and spatial_dims == 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that training a model takes on its device (see :func:`estimate_training_memory`)."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward, at ``batch`` images (plus autocast's reduced-precision weight copies)
    per_sample_gradients: int  # DP-SGD only: every image's gradient, and the largest convolution's unfolded input
    batch: int  # images per forward pass the activations were sized for
    reserve: int = 0  # outside the model's tensors: a CUDA context
    # the evaluation pass (no gradients, train.eval_batch_size images): parameters, and the widest layer's input and
    # output twice over (what is alive at once, a residual branch's input included); 0 when not estimated
    evaluation: int = 0
    eval_batch: int = 0

    @property
    def total(self) -> int:
        """The sum of the parts (before the safety factor)."""
        return (self.parameters + self.gradients + self.optimizer_state + self.activations
                + self.per_sample_gradients)

    @property
    def required(self) -> int:
        """What a device must hold: the larger of training's sum and the evaluation pass, times
        :data:`SAFETY_FACTOR`, plus the reserve."""
        return math.ceil(max(self.total, self.evaluation) * SAFETY_FACTOR) + self.reserve

    def describe(self) -> str:
        parts = [f"parameters {_gib(self.parameters)}", f"gradients {_gib(self.gradients)}",
                 f"optimizer state {_gib(self.optimizer_state)}",
                 f"activations {_gib(self.activations)} at {self.batch} images per pass"]
        if self.per_sample_gradients:
            parts.append(f"per-sample gradients {_gib(self.per_sample_gradients)}")
        if self.reserve:
            parts.append(f"CUDA context {_gib(self.reserve)}")
        if self.evaluation:
            parts.append(f"evaluation {_gib(self.evaluation)} at {self.eval_batch} images per pass")
        return ", ".join(parts)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _bytes_of(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_bytes_of(o) for o in output)
    if isinstance(output, dict):
        return sum(_bytes_of(o) for o in output.values())
    return 0


def _output_bytes(
    model: nn.Module, batch: torch.Tensor, half: bool, params: dict[str, torch.Tensor]
) -> tuple[int, int, int]:
    """Bytes of every leaf module's output in one training-mode forward pass (the input counted too; under
    autocast, ``half``, convolutions and linear layers give 2-byte outputs), of the largest trainable
    convolution's input and unfolded input (what DP-SGD's per-sample gradient of that layer works on), and of the
    widest leaf's input and output together (float32: what a pass without gradients holds at once)."""
    total, unfold, widest = [_bytes_of(batch)], [0], [0]
    trainable = {id(m) for m in model.modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        size = _bytes_of(output)
        total[0] += size // 2 if half and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) else size
        widest[0] = max(widest[0], size + (_bytes_of(args[0]) if args else 0))
        if id(module) in trainable and isinstance(output, torch.Tensor):
            conv = cast(nn.modules.conv._ConvNd, module)
            positions = output.numel() // max(1, output.shape[1])  # images x output positions
            patch = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
            unfold[0] = max(unfold[0], (positions * patch + args[0].numel()) * _FLOAT_BYTES)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    training = model.training
    try:
        model.train()
        with torch.no_grad():
            torch.func.functional_call(model, params, (batch,))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return total[0], unfold[0], widest[0]


def _activation_bytes(
    model: nn.Module, input_shape: Sequence[int], batch: int, half: bool
) -> tuple[int, int, int]:
    """:func:`_output_bytes` of a forward pass of ``batch`` images, on the ``meta`` device (shapes only, nothing
    allocated); a model whose forward needs real values is measured at one image on its own device and scaled."""
    named = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    try:
        meta = {name: torch.empty_like(t, device="meta") for name, t in named.items()}
        return _output_bytes(model, torch.empty((batch, *input_shape), device="meta"), half, meta)
    except Exception:  # noqa: BLE001 - a forward that reads values (or builds tensors elsewhere) cannot run on meta
        logger.debug("the meta-device forward failed; measuring one image on the model's device", exc_info=True)
    device = next((t.device for t in named.values()), torch.device("cpu"))
    outputs, unfold, widest = _output_bytes(model, torch.zeros((1, *input_shape), device=device), half, named)
    return outputs * batch, unfold * batch, widest * batch


def _poisson_high(batch: int) -> int:
    """A Poisson-sampled batch of expected size ``batch`` stays below this (4 standard deviations above)."""
    return batch + math.ceil(4 * math.sqrt(batch))


def estimate_training_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    dp: bool,
    physical_batch_size: int,
    amp_dtype: torch.dtype | None,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    device: torch.device | None = None,
    eval_batch_size: int | None = None,
) -> MemoryEstimate:
    """What training ``model`` on images of ``input_shape`` (one image: channels, then spatial sizes) needs.

    Parameters and buffers at their own size; gradients, and the optimizer's state (AdamW/Adam: two moments, SGD
    with momentum: one buffer) of the trainable parameters; activations: every leaf module's output in a forward
    pass of the batch, run on torch's ``meta`` device (shapes only, nothing allocated), times 2 for backward
    (autograd keeps what it saved while the gradients of the outputs flow back); under autocast the convolutions'
    and linear layers' outputs at 2 bytes, plus 2-byte copies of the weights. Under DP (``dp``: Opacus DP-SGD) the
    batch of one pass is at most ``physical_batch_size`` (Opacus' BatchMemoryManager) and each image's gradient of
    every trainable parameter is held as well (per-sample gradients: trainable parameters x that batch, float32),
    with the largest trainable convolution's input and unfolded input (its per-sample gradient's workspace).
    ``device`` adds :data:`CUDA_CONTEXT_BYTES` on a GPU. With ``eval_batch_size`` the evaluation pass is estimated
    too (no gradients: the parameters and twice the widest layer's input plus output at that batch; at full
    resolution the default ``train.eval_batch_size`` of 256 can need more than training at batch 32), and the
    device must hold the larger of the two.

    Accuracy, measured on a 2-core CPU with torch 2.13 (the rise of a fresh process's peak resident memory,
    ``ru_maxrss``, over one epoch of two AdamW steps above its resident memory before the model was built, after a
    warm-up step that loaded the libraries; tests/unit/common/test_hardware.py measures smallcnn at 64 px): for
    smallcnn and resnet18 at 28, 64 and 128 px, batch 32, the sum of the parts (:attr:`MemoryEstimate.total`) was
    1.1-1.6 x the measured peak under DP-SGD (physical batch 32; 2.0 x for resnet18 at batch 64) and 1.5-2.5 x
    without DP (the factor 2 for backward is conservative there: most outputs are saved once, and the gradients of
    activations are freed as backward goes). With CPU bfloat16 autocast it was 2.6-2.9 x (on a CPU the norms and
    activations run in bfloat16 too; on a GPU autocast keeps the norms in float32, as counted here). Repeated
    measurements varied by about 15 %. :attr:`MemoryEstimate.required` (times :data:`SAFETY_FACTOR`) was thus never
    below 1.3 x the measured peak, and at most about 3 x it (3.6 x with CPU bfloat16). Not measured on a GPU:
    cuDNN's workspaces and the caching allocator's fragmentation come on top there, which the margin is meant to
    cover; the data loader's batches in flight are left out.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * _FLOAT_BYTES for p in trainable)
    stored = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    moments = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}.get(str(optimizer), 2)
    batch = min(physical_batch_size, _poisson_high(batch_size)) if dp else batch_size
    half = amp_dtype is not None
    outputs, unfold, widest = _activation_bytes(model, input_shape, batch, half)
    activations = 2 * outputs
    if half:
        activations += sum(p.numel() for p in trainable) * 2
    return MemoryEstimate(
        parameters=stored,
        gradients=trainable_bytes,
        optimizer_state=moments * trainable_bytes,
        activations=activations,
        per_sample_gradients=trainable_bytes * batch + unfold if dp else 0,
        batch=batch,
        reserve=CUDA_CONTEXT_BYTES if device is not None and device.type == "cuda" else 0,
        evaluation=stored + 2 * math.ceil(widest * eval_batch_size / batch) if eval_batch_size else 0,
        eval_batch=eval_batch_size or 0,
    )


def estimate_for_config(
    cfg: Config, model: nn.Module, input_shape: Sequence[int], device: torch.device
) -> MemoryEstimate:
    """:func:`estimate_training_memory` for the recipe ``cfg`` on ``device`` (its batch, optimizer, DP, AMP)."""
    from medfed.common.config import DPConfig

    dp = isinstance(cfg.privacy, DPConfig)  # DP-SGD, or distributed DP's per-sample clipping
    physical = cfg.privacy.max_physical_batch_size if isinstance(cfg.privacy, DPConfig) else cfg.train.batch_size
    dtype = None if dp else amp_dtype(str(cfg.train.amp), device, dp=False)
    return estimate_training_memory(model, input_shape, cfg.train.batch_size, dp=dp, physical_batch_size=physical,
                                    amp_dtype=dtype, optimizer=str(cfg.train.optimizer),
                                    momentum=cfg.train.momentum, device=device,
                                    eval_batch_size=cfg.train.eval_batch_size)


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device, declared_gb: float = 0.0) -> int | None:
    """Bytes the device offers training: ``declared_gb`` GiB when > 0 (the site's word), else a GPU's total
    memory, or the machine's available RAM for a CPU (psutil when installed, else /proc/meminfo's MemAvailable);
    None when it cannot be told (no check then)."""
    if declared_gb > 0:
        return int(declared_gb * GIB)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def fit_problem(estimate: MemoryEstimate, available_bytes: int | None, where: str) -> str | None:
    """Why training cannot fit ``available_bytes`` (None: it fits, or the memory is unknown). ``where`` opens the
    text (the device and whose memory it is); the text carries sizes and config keys only, never a path."""
    if available_bytes is None or estimate.required <= available_bytes:
        return None
    return (
        f"{where}: training this model needs about {_gib(estimate.required)} ({estimate.describe()}; "
        f"x{SAFETY_FACTOR:g} margin), but {_gib(available_bytes)} are available. To fit: a smaller train.batch_size "
        "(under DP, a smaller privacy.max_physical_batch_size: the same logical batch in smaller passes)"
        + (", a smaller train.eval_batch_size (the evaluation pass needs the most)"
           if estimate.evaluation > estimate.total else "")
        + ", a smaller image size, a smaller model (e.g. model=smallcnn or a smaller model.width), or a device with "
        "more memory."
    )


def require_fits(estimate: MemoryEstimate, available_bytes: int | None, where: str) -> None:
    """Raise :class:`ConfigError` when training cannot fit (see :func:`fit_problem`)."""
    problem = fit_problem(estimate, available_bytes, where)
    if problem is not None:
        raise ConfigError(problem)
