"""Tests of common.models.weights: numpy round trips, strict loading, checkpoints."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.common.config import ModelConfig
from medfed.common.errors import IncompatibleUpdateError
from medfed.common.models import build_model
from medfed.common.models.weights import (
    get_weights,
    load_checkpoint,
    load_state_dict_numpy,
    save_checkpoint,
    set_weights,
    state_dict_to_numpy,
)


def _model(seed: int, n_classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="smallcnn", width=4), spatial_dims=2, in_channels=1, n_classes=n_classes)


def test_get_set_round_trip() -> None:
    # Prepare
    source, target = _model(0), _model(1)
    weights = get_weights(source)

    # Execute
    set_weights(target, weights)

    # Assert
    assert [w.shape for w in weights] == [tuple(t.shape) for t in source.state_dict().values()]
    assert all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in weights)
    for key, tensor in target.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[key])


def test_get_weights_returns_copies() -> None:
    # Prepare
    model = _model(0)
    weights = get_weights(model)

    # Execute
    weights[0][...] = 42.0

    # Assert
    assert not torch.any(next(iter(model.state_dict().values())) == 42.0)


def test_set_weights_wrong_shape_names_the_layer() -> None:
    # Prepare
    model = _model(0)
    weights = get_weights(_model(1, n_classes=3))
    before = get_weights(model)

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError, match=r"head\.weight: expected shape \(2, 16\), got \(3, 16\)"):
        set_weights(model, weights)
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))


def test_set_weights_wrong_count() -> None:
    # Prepare
    model = _model(0)
    weights = get_weights(model)[:-1]

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError, match=rf"Received {len(weights)} weight arrays but the model has"):
        set_weights(model, weights)


def test_set_weights_casts_float64() -> None:
    # Prepare
    model = _model(0)
    weights = [w.astype(np.float64) for w in get_weights(_model(1))]

    # Execute
    set_weights(model, weights)

    # Assert
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert np.allclose(get_weights(model)[0], weights[0])


def test_state_dict_numpy_round_trip() -> None:
    # Prepare
    source, target = _model(0), _model(1)

    # Execute
    arrays = state_dict_to_numpy(source)
    load_state_dict_numpy(target, arrays)

    # Assert
    assert list(arrays) == list(source.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(source), get_weights(target), strict=True))


def test_load_state_dict_numpy_lists_every_problem() -> None:
    # Prepare
    model = _model(0)
    arrays = state_dict_to_numpy(model)
    arrays.pop("head.bias")
    arrays["extra.weight"] = np.zeros(3, dtype=np.float32)
    arrays["head.weight"] = np.zeros((5, 16), dtype=np.float32)

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError) as info:
        load_state_dict_numpy(model, arrays)
    message = str(info.value)
    assert "missing keys: head.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "head.weight: expected shape (2, 16), got (5, 16)" in message


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    # Prepare
    model = _model(0)
    arrays = state_dict_to_numpy(model)
    meta = {"round": 3, "metrics": {"auc": 0.9, "loss": None}, "model": "smallcnn", "tags": ["a", "b"]}
    path = tmp_path / "round-3.pt"

    # Execute
    save_checkpoint(path, arrays, meta)
    loaded, loaded_meta = load_checkpoint(path)

    # Assert
    assert isinstance(loaded, OrderedDict)
    assert list(loaded) == list(arrays)
    assert all(np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype for k in arrays)
    assert loaded_meta == meta
    assert [p.name for p in tmp_path.iterdir()] == ["round-3.pt"]  # no temporary file left behind


def test_checkpoint_overwrite_is_atomic_replace(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": np.zeros(2, dtype=np.float32)}, {"round": 1})

    # Execute
    save_checkpoint(path, {"w": np.ones(2, dtype=np.float32)}, {"round": 2})
    arrays, meta = load_checkpoint(path)

    # Assert
    assert meta == {"round": 2}
    assert np.array_equal(arrays["w"], np.ones(2, dtype=np.float32))


def test_save_checkpoint_rejects_unloadable_meta(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match=r"meta\['when'\] has type object"):
        save_checkpoint(tmp_path / "x.pt", {}, {"when": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"],
)
def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "broken.pt"
    path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError, match=r"Checkpoint file 'broken\.pt' is corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "cut.pt"
    save_checkpoint(path, state_dict_to_numpy(_model(0)), {"round": 1})
    path.write_bytes(path.read_bytes()[:200])

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError, match=r"'cut\.pt' is corrupt"):
        load_checkpoint(path)


def test_checkpoint_with_wrong_layout(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "other.pt"
    torch.save({"weights": [torch.zeros(2)]}, path)

    # Execute / Assert
    with pytest.raises(IncompatibleUpdateError, match=r"'other\.pt' does not have the medfed layout"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"'absent\.pt' does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
