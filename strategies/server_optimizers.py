"""Server optimizers: Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad, with their state made checkpointable.

The strategies are Flower's own; medfed adds two things by overriding, never by copying ``Strategy.start``:

- the new global model keeps the dtypes of the model the round started from (Flower's update arithmetic promotes
  float32 weights to float64 and integer buffers to float, which doubles every message and which a hospital's
  model would refuse for an integer buffer);
- :func:`strategy_state` / :func:`restore_strategy_state` export and restore the optimizer's moments (FedAdam's and
  FedYogi's ``m_t``/``v_t``, FedAdagrad's accumulated squares, FedAvgM's momentum) as named arrays, which the
  ServerApp writes into each round's checkpoint, so ``--resume`` continues the optimizer exactly where it stopped.
  The round counter in FedAdam's bias correction needs no state: a resumed run passes absolute round numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from medfed.common.errors import ConfigError

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "restore_strategy_state", "strategy_state"]

logger = logging.getLogger(__name__)

_FIRST, _SECOND, _MOMENTUM = "m_t", "v_t", "momentum"


class _KeepsDtypes(flwr_strategy.Strategy):
    """Mixin: cast the aggregated model back to the dtypes of the model sent out for training."""

    _dtypes: dict[str, np.dtype]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._dtypes = {name: array.numpy().dtype for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[safe-super]  # a mixin before a Flower strategy

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[safe-super]  # a mixin before a Flower strategy
        dtypes = getattr(self, "_dtypes", {})
        if arrays is None or not dtypes:
            return arrays, metrics
        cast = {}
        for name, array in arrays.items():
            values = array.numpy()
            dtype = dtypes.get(name, values.dtype)
            if dtype.kind in "iub" and values.dtype.kind == "f":
                values = np.rint(values)
            cast[name] = Array(np.ascontiguousarray(values.astype(dtype, copy=False)))
        return ArrayRecord(cast), metrics


class FedAvgM(_KeepsDtypes, flwr_strategy.FedAvgM):
    """Flower's FedAvgM, keeping the model's dtypes."""


class FedAdam(_KeepsDtypes, flwr_strategy.FedAdam):
    """Flower's FedAdam, keeping the model's dtypes."""


class FedYogi(_KeepsDtypes, flwr_strategy.FedYogi):
    """Flower's FedYogi, keeping the model's dtypes."""


class FedAdagrad(_KeepsDtypes, flwr_strategy.FedAdagrad):
    """Flower's FedAdagrad, keeping the model's dtypes."""


def _innermost(strategy: flwr_strategy.Strategy) -> flwr_strategy.Strategy:
    """The strategy that aggregates, under medfed's and Flower's wrappers (``inner`` / ``strategy``)."""
    seen = 0
    while seen < 8:
        wrapped = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
        if not isinstance(wrapped, flwr_strategy.Strategy):
            return strategy
        strategy, seen = wrapped, seen + 1
    return strategy


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, np.ndarray]:
    """The server optimizer's moments as ``"<moment>/<layer>" -> array`` (empty for stateless strategies or before
    the first aggregation)."""
    inner = _innermost(strategy)
    state: dict[str, np.ndarray] = {}
    if isinstance(inner, FedOpt):
        for moment, values in ((_FIRST, inner.m_t), (_SECOND, inner.v_t)):
            for name, array in (values or {}).items():
                state[f"{moment}/{name}"] = np.array(array, copy=True)
    elif isinstance(inner, flwr_strategy.FedAvgM) and inner.momentum_vector is not None:
        if inner.current_arrays is None:  # pragma: no cover - Flower sets both in the same aggregation
            return state
        for name, array in zip(inner.current_arrays.keys(), inner.momentum_vector, strict=True):
            state[f"{_MOMENTUM}/{name}"] = np.array(array, copy=True)
    return state


def _moment(state: Mapping[str, np.ndarray], moment: str, names: list[str]) -> dict[str, np.ndarray] | None:
    values = {key.split("/", 1)[1]: np.asarray(v) for key, v in state.items() if key.startswith(moment + "/")}
    if not values:
        return None
    if list(values) != names and set(values) != set(names):
        missing = sorted(set(names) - set(values))[:5]
        unexpected = sorted(set(values) - set(names))[:5]
        raise ConfigError(
            f"The checkpoint's server optimizer state ({moment}) does not fit the model (missing {missing}, "
            f"unexpected {unexpected}); it was written by a run with another model config. Start a new run."
        )
    return {name: values[name] for name in names}


def restore_strategy_state(
    strategy: flwr_strategy.Strategy, state: Mapping[str, np.ndarray], names: list[str]
) -> bool:
    """Load what :func:`strategy_state` exported into ``strategy`` (whose model has the layers ``names``).

    Returns whether there was state to restore. Raises :class:`ConfigError` if it does not fit the model.
    """
    inner = _innermost(strategy)
    if isinstance(inner, FedOpt):
        inner.m_t, inner.v_t = _moment(state, _FIRST, names), _moment(state, _SECOND, names)
        return inner.m_t is not None or inner.v_t is not None
    if isinstance(inner, flwr_strategy.FedAvgM):
        momentum = _moment(state, _MOMENTUM, names)
        inner.momentum_vector = None if momentum is None else [momentum[name] for name in names]
        return momentum is not None
    if state:
        raise ConfigError(
            f"The checkpoint holds server optimizer state ({sorted({k.split('/')[0] for k in state})}) but "
            f"strategy {type(inner).__name__} keeps none; resume with the strategy the run was started with."
        )
    return False
