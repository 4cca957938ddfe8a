"""Schemas of the ``strategy`` group: the aggregation the coordinator runs and each strategy's own options."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medfed.common.config.checks import require_fraction
from medfed.common.errors import ConfigError

__all__ = [
    "AdaptiveMomentsConfig",
    "KrumConfig",
    "ProxConfig",
    "ServerMomentumConfig",
    "ServerOptimizerConfig",
    "StrategyConfig",
    "TrimmedMeanConfig",
]

logger = logging.getLogger(__name__)

_COMPRESSIONS = ("none", "fp16", "int8")  # common.compression.COMPRESSIONS (a test keeps the two equal)


@dataclass
class StrategyConfig:
    """Which aggregation strategy the coordinator runs, and how many hospitals take part each round."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout_s: float = 3600.0  # how long each phase of a round waits for replies before going on without
    max_update_norm_ratio: float = 10.0  # reject an update farther from the global model than this x the median; 0 off
    compression: str = "none"  # what a hospital sends: none (float32 weights), fp16 or int8 updates (common.compression)

    def __post_init__(self) -> None:
        if self.compression not in _COMPRESSIONS:
            raise ConfigError(
                f"strategy.compression={self.compression!r} is not known; choose one of: {', '.join(_COMPRESSIONS)} "
                "(none: float32 weights; fp16: half the bytes; int8: about a quarter, stochastically rounded)."
            )
        require_fraction("strategy.fraction_train", self.fraction_train)
        require_fraction("strategy.fraction_evaluate", self.fraction_evaluate, low_open=False)
        for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must be >= 1.")
        if not self.max_update_norm_ratio >= 0:
            raise ConfigError(
                f"strategy.max_update_norm_ratio={self.max_update_norm_ratio!r} is out of range; it must be >= 0 "
                "(0 turns the check off; 10 rejects an update 10 x farther from the global model than the median)."
            )
        if not self.round_timeout_s > 0:
            raise ConfigError(
                f"strategy.round_timeout_s={self.round_timeout_s!r} is out of range; it must be > 0 seconds (the "
                "time each phase of a round waits for the hospitals' replies)."
            )


@dataclass
class ProxConfig(StrategyConfig):
    """Flower's FedProx: FedAvg whose hospitals add (mu / 2) * ||w - w_global||^2 to their local loss."""

    name: str = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu >= 0.0:
            raise ConfigError(
                f"strategy.mu={self.mu!r} is out of range; it must be >= 0 (the proximal weight; 0 is FedAvg, "
                "0.001-1 are usual)."
            )


@dataclass
class TrimmedMeanConfig(StrategyConfig):
    """Flower's FedTrimmedAvg: per coordinate, the mean after cutting ``beta`` of the updates at each end."""

    name: str = "fedtrimmedavg"
    beta: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(
                f"strategy.beta={self.beta!r} is out of range; it must lie in [0, 0.5) (the share of updates cut at "
                "each end of every coordinate; 0.2 of 5 hospitals cuts one at each end)."
            )


@dataclass
class KrumConfig(StrategyConfig):
    """Flower's Krum / MultiKrum: keep the update(s) closest to their neighbours, tolerating
    ``num_malicious_nodes`` attackers; MultiKrum averages the ``num_nodes_to_select`` best."""

    name: str = "krum"
    num_malicious_nodes: int = 1
    num_nodes_to_select: int = 1  # multikrum only

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, minimum in (("num_malicious_nodes", 0), ("num_nodes_to_select", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must be an integer >= {minimum}.")


@dataclass
class ServerMomentumConfig(StrategyConfig):
    """Flower's FedAvgM: the averaged update is a pseudo-gradient for server SGD with momentum."""

    name: str = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.server_learning_rate > 0.0:
            raise ConfigError(
                f"strategy.server_learning_rate={self.server_learning_rate!r} is out of range; it must be > 0 "
                "(1.0 applies the averaged update as it is)."
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"strategy.server_momentum={self.server_momentum!r} is out of range; it must lie in [0, 1) "
                "(0 is FedAvg with a server learning rate; 0.9 is usual)."
            )


@dataclass
class ServerOptimizerConfig(StrategyConfig):
    """Flower's adaptive server optimizers (Reddi et al. 2021): the averaged update is a pseudo-gradient for a
    server-side step of size ``eta``; ``tau`` bounds how adaptive it is. FedAdagrad takes these two."""

    name: str = "fedadagrad"
    # chosen on federated validation AUC at Dirichlet 0.1 (benchmarks/server_optimizers.py): Flower's eta 0.01 took
    # server steps of about 0.01 per weight from round 1, which inverted PneumoniaMNIST's model (test AUC 0.45)
    eta: float = 0.001
    tau: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta > 0.0:
            raise ConfigError(
                f"strategy.eta={self.eta!r} is out of range; it must be > 0 (the server learning rate; "
                "0.001-0.1 are usual)."
            )
        if not self.tau > 0.0:
            raise ConfigError(
                f"strategy.tau={self.tau!r} is out of range; it must be > 0 (the adaptivity: larger is closer to "
                "server SGD; 0.001 is usual)."
            )


@dataclass
class AdaptiveMomentsConfig(ServerOptimizerConfig):
    """FedAdam and FedYogi: a server optimizer with first (``beta_1``) and second (``beta_2``) moment decay."""

    name: str = "fedadam"
    beta_1: float = 0.9
    beta_2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta_1", "beta_2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"strategy.{key}={value!r} is out of range; it must lie in [0, 1).")
