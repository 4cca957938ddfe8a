"""Registry of the networks medfed can build, by name.

Model modules register a factory with :func:`register_model`; :func:`build_model` maps a
:class:`~common.config.ModelConfig` plus the dataset's geometry to a ``torch.nn.Module``. Names come from the
(possibly remote) configuration, so only registered factories can ever be built: nothing is imported or
instantiated from a string. The built-in models register themselves when ``common.models`` is imported, which
happens before this module runs (it is a submodule of that package), so callers never import them by hand.

A factory has the keyword-only signature
``factory(*, spatial_dims, in_channels, n_classes, width, dropout, norm, **options) -> nn.Module`` (``options``: what
the model's config schema adds, :meth:`~common.config.ModelConfig.factory_options`) and returns a module whose
``forward`` maps ``(B, in_channels, *spatial)`` to logits ``(B, n_classes)``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from medfed.common.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from medfed.common.config import ModelConfig

__all__ = [
    "ModelFactory",
    "available_models",
    "build_model",
    "register_model",
    "require_dp_compatible",
    "require_model",
]

logger = logging.getLogger(__name__)

SPATIAL_DIMS = (2, 3)


class ModelFactory(Protocol):
    """Signature every registered factory implements."""

    def __call__(
        self, *, spatial_dims: int, in_channels: int, n_classes: int, width: int, dropout: float, norm: str
    ) -> nn.Module: ...


F = TypeVar("F", bound=Callable[..., "nn.Module"])

# The one module-level mutable object: filled by @register_model when the model modules are imported.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``.

    Raises:
        ValueError: if ``name`` is empty or already taken by a different factory.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"register_model(name={name!r}): the name must be a non-empty string without spaces.")

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified(existing) != _qualified(factory):
            raise ValueError(
                f"Model name {name!r} is already registered by {_qualified(existing)}; "
                f"cannot register {_qualified(factory)} under the same name. Pick another name."
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualified(factory: Callable[..., object]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def available_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def _check_int(key: str, value: object, *, allowed: tuple[int, ...] = (), minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} is not an integer; it must be an int.")
    if allowed and value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of: {', '.join(map(str, allowed))}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value!r} is out of range; it must be >= {minimum}.")


def require_model(name: str) -> None:
    """Raise :class:`ConfigError` (listing the choices) unless ``name`` is a registered model."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.name={name!r} is not a registered model; choose one of: {', '.join(available_models())}."
        )


def build_model(
    cfg: ModelConfig, *, spatial_dims: int, in_channels: int, n_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build the registered network ``cfg.name`` for images with the given geometry.

    Args:
        cfg: model name, width, dropout and normalisation (``group`` | ``batch``).
        spatial_dims: 2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, D, H, W)``.
        in_channels: image channels (1 grey, 3 RGB).
        n_classes: number of output logits, >= 2 (binary tasks use two logits and softmax).
        image_size: the images' side in pixels when known; passed to factories that take it (resnet18's
            ``model.stem=auto`` picks its stem by it).

    Raises:
        ConfigError: unknown model name (listing the choices) or an out-of-range argument.
    """
    require_model(cfg.name)
    _check_int("spatial_dims", spatial_dims, allowed=SPATIAL_DIMS)
    _check_int("in_channels", in_channels, minimum=1)
    _check_int("n_classes", n_classes, minimum=2)
    factory = _REGISTRY[cfg.name]
    options = cfg.factory_options()
    if image_size is not None and "image_size" in inspect.signature(factory).parameters:
        options["image_size"] = image_size
    model = factory(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        n_classes=n_classes,
        width=cfg.width,
        dropout=cfg.dropout,
        norm=cfg.norm,
        **options,
    )
    set_trainable(model, cfg.finetune)
    logger.debug(
        "Built model %s (spatial_dims=%d, in_channels=%d, n_classes=%d, width=%d, dropout=%s, norm=%s): %d parameters",
        cfg.name,
        spatial_dims,
        in_channels,
        n_classes,
        cfg.width,
        cfg.dropout,
        cfg.norm,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def last_encoder_stage(model: nn.Module) -> str:
    """The dotted name of the encoder's last stage with weights (``encoder.block3_1`` for ``smallcnn``,
    ``encoder.layer4`` for ``resnet18``).

    Raises:
        ConfigError: the model has no ``encoder`` with a weighted stage.
    """
    from torch import nn

    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module):
        stages = [name for name, child in encoder.named_children() if any(True for _ in child.parameters())]
        if stages:
            return f"encoder.{stages[-1]}"
    raise ConfigError(f"{type(model).__name__} has no encoder stage with weights (medfed's models have one).")


def set_trainable(model: nn.Module, finetune: str) -> None:
    """Which parameters train: ``full`` all; ``partial`` the encoder's last stage with weights and the head;
    ``linear_probe`` the head only. Frozen parameters keep ``requires_grad=False`` (Opacus skips them too)."""
    trainable: tuple[str, ...] = ("",) if finetune == "full" else ("head.",)
    if finetune == "partial":
        trainable = ("head.", last_encoder_stage(model) + ".")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(trainable)


def require_dp_compatible(model: nn.Module, name: str) -> None:
    """Refuse, at start-up, a model Opacus cannot train with per-sample gradients (BatchNorm, in-place ops ...).

    Raises:
        ConfigError: listing Opacus' findings and the registered models that pass.
    """
    from opacus.validators import ModuleValidator

    from torch import nn

    findings = {str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)}
    # Opacus matches BatchNorm by exact type; medfed's FederatedBatchNorm (a subclass) must be caught here
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        findings.add(f"BatchNorm layers ({', '.join(batch_norms[:3])}{', ...' if len(batch_norms) > 3 else ''}) "
                     "mix the images of a batch")
    if findings:
        found = "; ".join(sorted(findings)[:5])
        raise ConfigError(
            f"model.name={name!r} cannot be trained with differential privacy: {found}. Use a model "
            "with GroupNorm and no in-place operations (medfed's smallcnn and resnet18 with model.norm=group are), "
            "or privacy=none."
        )
