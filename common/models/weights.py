"""Model weights as numpy arrays: the form they travel in (Flower ``ArrayRecord``) and are checkpointed in.

Two views of the same state dict: a list of arrays in ``state_dict()`` order (:func:`get_weights` /
:func:`set_weights`) and a name -> array mapping (:func:`state_dict_to_numpy` / :func:`load_state_dict_numpy`).
Every loader is strict: a missing or unexpected key, a shape or a dtype-kind mismatch raises
:class:`~common.errors.IncompatibleUpdateError` naming the layers, before the model is touched.

Checkpoints are ``torch.save``'d dicts ``{"state_dict": {name: tensor}, "meta": dict}`` (plus optional named
sections of arrays that travel with the weights, such as a server optimizer's moments), written atomically
(temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``, so loading one never runs code.
Pass the *unwrapped* model (not Opacus' ``GradSampleModule``) so the keys carry no ``_module.`` prefix.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfed.common.atomic import atomic_write
from medfed.common.errors import IncompatibleUpdateError

__all__ = [
    "get_weights",
    "load_checkpoint",
    "load_checkpoint_section",
    "load_state_dict_numpy",
    "save_checkpoint",
    "set_weights",
    "state_dict_to_numpy",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 10
_META_SCALARS = (str, int, float, bool, type(None))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Copies of the model's state-dict values (parameters and buffers), in ``state_dict()`` order."""
    return [_to_numpy(t) for t in model.state_dict().values()]


def state_dict_to_numpy(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The model's state dict as an ordered name -> numpy copy mapping."""
    return OrderedDict((k, _to_numpy(t)) for k, t in model.state_dict().items())


def _kind_compatible(array: np.ndarray, target: torch.Tensor) -> bool:
    if target.is_floating_point():
        return array.dtype.kind == "f"
    if target.dtype == torch.bool:
        return array.dtype.kind == "b"
    return array.dtype.kind in "iu"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _check_and_convert(
    key: str, array: object, target: torch.Tensor, problems: list[str]
) -> torch.Tensor | None:
    arr = np.asarray(array)
    if tuple(arr.shape) != tuple(target.shape):
        problems.append(f"{key}: expected shape {tuple(target.shape)}, got {tuple(arr.shape)}")
        return None
    if not _kind_compatible(arr, target):
        problems.append(f"{key}: expected dtype compatible with {target.dtype}, got {arr.dtype}")
        return None
    return torch.tensor(arr, dtype=target.dtype, device=target.device)


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load arrays given in ``state_dict()`` order (the inverse of :func:`get_weights`).

    Floating arrays are cast to the parameter's dtype (e.g. float64 -> float32); a float array for an integer
    buffer is refused.

    Raises:
        IncompatibleUpdateError: wrong number of arrays, or the first layer whose shape/dtype differs (its key,
            expected and received shape). The model is left unchanged.
    """
    state = model.state_dict()
    weights = list(weights)
    if len(weights) != len(state):
        raise IncompatibleUpdateError(
            f"Received {len(weights)} weight arrays but the model has {len(state)} state-dict entries; "
            "all sites must build the same model (model.name, model.width, dataset channels and classes)."
        )
    new_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (key, target), array in zip(state.items(), weights, strict=True):
        problems: list[str] = []
        tensor = _check_and_convert(key, array, target, problems)
        if tensor is None:
            raise IncompatibleUpdateError(
                f"Weight array {len(new_state)} does not fit layer {problems[0]}; "
                "all sites must build the same model config."
            )
        new_state[key] = tensor
    model.load_state_dict(new_state, strict=True)


def load_state_dict_numpy(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load a name -> array mapping strictly (the inverse of :func:`state_dict_to_numpy`).

    Raises:
        IncompatibleUpdateError: listing every missing key, unexpected key and shape/dtype mismatch at once.
            The model is left unchanged.
    """
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    unexpected = [k for k in arrays if k not in state]
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    new_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, target in state.items():
        if key in arrays:
            tensor = _check_and_convert(key, arrays[key], target, problems)
            if tensor is not None:
                new_state[key] = tensor
    if problems:
        raise IncompatibleUpdateError(
            "State dict does not fit the model: " + "; ".join(problems) + ". "
            "The weights were made for a different model config (model.name, model.width, channels, classes)."
        )
    model.load_state_dict(new_state, strict=True)


def _check_meta(value: object, where: str) -> None:
    if isinstance(value, _META_SCALARS):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"Checkpoint meta key {where}[{key!r}] is not a string; use str keys.")
            _check_meta(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_meta(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"Checkpoint meta value {where} has type {type(value).__name__}; only str, int, float, bool, None, "
        "lists and str-keyed dicts are allowed (convert numpy scalars with float()/int())."
    )


def save_checkpoint(
    path: Path,
    model_arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    sections: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> None:
    """Write ``{"state_dict": {name: tensor}, "meta": dict(meta)}`` to ``path`` atomically; ``sections`` (name ->
    arrays, e.g. the server optimizer's state) go into the same file, so they always match the weights.

    The file is written to a temporary file in the same directory and renamed over ``path``, so a reader never
    sees a half-written checkpoint. The parent directory must exist.

    Raises:
        TypeError: ``meta`` holds a value ``torch.load(weights_only=True)`` could not read back.
    """
    path = Path(path)
    _check_meta(dict(meta), "meta")
    payload = {
        "state_dict": {str(k): torch.tensor(np.asarray(v)) for k, v in model_arrays.items()},
        "meta": dict(meta),
    }
    if sections:
        payload["sections"] = {
            str(name): {str(k): torch.tensor(np.asarray(v)) for k, v in arrays.items()}
            for name, arrays in sections.items()
        }
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    logger.debug("Saved checkpoint %s (%d arrays)", path.name, len(payload["state_dict"]))


def load_checkpoint(path: Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(name -> array, meta)``.

    Raises:
        FileNotFoundError: the file does not exist (the message names the file).
        IncompatibleUpdateError: the file is not a readable medfed checkpoint (truncated, corrupt, wrong layout).
    """
    payload = _read_payload(Path(path))
    arrays = OrderedDict((k, _to_numpy(v)) for k, v in payload["state_dict"].items())
    return arrays, dict(payload["meta"])


def load_checkpoint_section(path: Path, name: str) -> dict[str, np.ndarray]:
    """The arrays a checkpoint keeps in section ``name`` (empty when it has none). Raises as :func:`load_checkpoint`."""
    path = Path(path)
    sections = _read_payload(path).get("sections", {})
    section = sections.get(name, {}) if isinstance(sections, Mapping) else None
    if not isinstance(section, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in section.items()
    ):
        raise IncompatibleUpdateError(f"Checkpoint file {path.name!r} has a malformed {name!r} section.")
    return {k: _to_numpy(v) for k, v in section.items()}


def _read_payload(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {path.name!r} does not exist in {path.parent.name!r}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        logger.debug("Cannot read checkpoint %s", path, exc_info=True)
        raise IncompatibleUpdateError(
            f"Checkpoint file {path.name!r} is corrupt or not a medfed checkpoint ({type(exc).__name__}); "
            "delete it or resume from an earlier checkpoint."
        ) from None
    if (
        not isinstance(payload, Mapping)
        or not isinstance(payload.get("state_dict"), Mapping)
        or not isinstance(payload.get("meta"), Mapping)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items())
    ):
        raise IncompatibleUpdateError(
            f"Checkpoint file {path.name!r} does not have the medfed layout "
            '{"state_dict": {name: tensor}, "meta": dict}; it was not written by medfed.'
        )
    return payload
