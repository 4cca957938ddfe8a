"""Registry of aggregation strategies by name (``strategy=<name>`` in Hydra).

Names map to factories; nothing that arrives over the network is ever imported or instantiated. Every factory
builds one of Flower's Message-API strategies (``flwr.serverapp.strategy``) from a :class:`StrategyConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypedDict, TypeVar

from flwr.app import MetricRecord, RecordDict

from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from medfed.common import keys
from medfed.common.config import (
    AdaptiveMomentsConfig,
    CentralDPConfig,
    KrumConfig,
    ProxConfig,
    ServerMomentumConfig,
    ServerOptimizerConfig,
    StrategyConfig,
    TrimmedMeanConfig,
)
from medfed.common.errors import ConfigError
from medfed.strategies import server_optimizers
from medfed.strategies.metrics import weighted_mean_ignoring_nan

__all__ = ["StrategyFactory", "available_strategies", "build_strategy", "require_strategy", "with_central_dp"]

logger = logging.getLogger(__name__)

StrategyFactory = Callable[[StrategyConfig], Strategy]


class _CommonArgs(TypedDict):
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str
    train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]
    evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]


_Options = TypeVar("_Options", bound=StrategyConfig)


def _common(cfg: StrategyConfig) -> _CommonArgs:
    """The arguments every Flower FedAvg-family strategy takes, from medfed's config and wire keys."""
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_available_nodes,
        "weighted_by_key": keys.NUM_EXAMPLES,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
        "train_metrics_aggr_fn": weighted_mean_ignoring_nan,
        "evaluate_metrics_aggr_fn": weighted_mean_ignoring_nan,
    }


def _options(cfg: StrategyConfig, schema: type[_Options]) -> _Options:
    if not isinstance(cfg, schema):  # pragma: no cover - the Hydra group gives each option its schema
        raise ConfigError(f"strategy={cfg.name} needs its options ({schema.__name__}); compose it with strategy={cfg.name}.")
    return cfg


def _fedavg(cfg: StrategyConfig) -> Strategy:
    return FedAvg(**_common(cfg))


def _fedprox(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, ProxConfig)
    return FedProx(**_common(cfg), proximal_mu=options.mu)


def _fedmedian(cfg: StrategyConfig) -> Strategy:
    return FedMedian(**_common(cfg))


def _fedtrimmedavg(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, TrimmedMeanConfig)
    return FedTrimmedAvg(**_common(cfg), beta=options.beta)


def _krum(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, KrumConfig)
    return Krum(**_common(cfg), num_malicious_nodes=options.num_malicious_nodes)


def _multikrum(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, KrumConfig)
    return MultiKrum(**_common(cfg), num_malicious_nodes=options.num_malicious_nodes,
                     num_nodes_to_select=options.num_nodes_to_select)


def _fedavgm(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, ServerMomentumConfig)
    return server_optimizers.FedAvgM(**_common(cfg), server_learning_rate=options.server_learning_rate,
                                     server_momentum=options.server_momentum)


def _fedadagrad(cfg: StrategyConfig) -> Strategy:
    options = _options(cfg, ServerOptimizerConfig)
    return server_optimizers.FedAdagrad(**_common(cfg), eta=options.eta, tau=options.tau)


def _adaptive_moments(flower_class: type[server_optimizers.FedAdam] | type[server_optimizers.FedYogi]) -> StrategyFactory:
    def factory(cfg: StrategyConfig) -> Strategy:
        options = _options(cfg, AdaptiveMomentsConfig)
        return flower_class(**_common(cfg), eta=options.eta, tau=options.tau,
                            beta_1=options.beta_1, beta_2=options.beta_2)

    return factory


# server optimizers: FedAvgM, FedAdam, FedYogi, FedAdagrad are Flower's, keeping the model's dtypes, with
# checkpointable moments (strategies.server_optimizers)
# robust aggregation: FedMedian, FedTrimmedAvg, Krum, MultiKrum are Flower's own, configured from medfed's config
_FACTORIES: dict[str, StrategyFactory] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedavgm": _fedavgm,
    "fedadam": _adaptive_moments(server_optimizers.FedAdam),
    "fedyogi": _adaptive_moments(server_optimizers.FedYogi),
    "fedadagrad": _fedadagrad,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
    "krum": _krum,
    "multikrum": _multikrum,
}


def available_strategies() -> list[str]:
    """Names accepted by ``strategy.name``."""
    return sorted(_FACTORIES)


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """Build the named strategy.

    Raises:
        ConfigError: if ``cfg.name`` is not registered (the message lists the choices).
    """
    require_strategy(cfg.name)
    return _FACTORIES[cfg.name](cfg)


def require_strategy(name: str) -> None:
    """Raise :class:`ConfigError` (listing the choices) unless ``name`` is a registered strategy."""
    if name not in _FACTORIES:
        raise ConfigError(
            f"strategy.name={name!r} is not a registered strategy; choose one of: {', '.join(available_strategies())}."
        )


def with_central_dp(strategy: Strategy, privacy: CentralDPConfig, hospitals: int) -> Strategy:
    """Wrap ``strategy`` in Flower's client-level DP (client-side fixed clipping, server-side noise) with Flower's
    RDP accountant over the ``hospitals`` that make up the population; every hospital trains every round.

    Raises:
        ConfigError: Flower's accountant needs the ``dp-accounting`` package, or sampling that is not every hospital.
    """
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
    from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    try:
        accountant = RdpAccountant(
            FlowerPrivacyConfig(
                target_delta=privacy.delta,
                population_size=hospitals,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    except ImportError as exc:
        raise ConfigError(
            f"privacy=central_dp needs Flower's accountant backend, the dp-accounting package ({exc}); "
            "install medfed with its dependencies (pip install -e .)."
        ) from None
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=privacy.noise_multiplier,
        clipping_norm=privacy.clipping_norm,
        num_sampled_clients=hospitals,
        accountant=accountant,
    )
