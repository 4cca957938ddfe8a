"""Rounds under Flower's SecAgg+ (``privacy.secure_aggregation=true``): the coordinator only sees the sum.

SecAgg+ exists only in Flower's legacy workflow path (``DefaultWorkflow`` with ``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` at the hospitals), so this runs the legacy workflow with Flower's legacy FedAvg. The
hospitals run the same ClientApp handlers and training core as in every other run (the ClientApp translates the
legacy message layout). Per round the ServerApp records the same things: per-site scalars (which are not secret),
federated validation, the test set, a checkpoint and one metrics.jsonl line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common import EvaluateRes, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from medfed.common import keys
from medfed.common.config import Config
from medfed.server.tracking import RunTracker, SiteRound, site_rounds

__all__ = ["run_secure_aggregation", "secagg_parameters"]

logger = logging.getLogger(__name__)

EvaluateTest = Callable[[dict[str, np.ndarray]], tuple[dict[str, float] | None, float]]


def secagg_parameters(cfg: Config) -> tuple[int, int]:
    """(shares, reconstruction threshold) for ``federation.hospitals`` hospitals; 0 in the config means auto."""
    shares = cfg.privacy.secagg_shares or cfg.federation.hospitals
    threshold = cfg.privacy.secagg_threshold or max(2, math.ceil(2 * shares / 3))
    return shares, min(threshold, shares)


def _site(metrics: dict[str, Scalar]) -> tuple[str, dict[str, float]]:
    site_id = str(metrics.get(keys.SITE_ID, "unknown-site"))
    return site_id, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != keys.SITE_ID}


class _RecordingFedAvg(FedAvg):
    """Flower's legacy FedAvg that also hands each round's per-site scalars to medfed's tracker."""

    def __init__(self, *, record: Callable[[int, dict[str, SiteRound], list[dict[str, str]]], None], **kwargs: Any):
        super().__init__(**kwargs)
        self._record = record
        self._train: dict[int, dict[str, dict[str, float]]] = {}
        self._dropped: dict[int, list[dict[str, str]]] = {}

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # under SecAgg+ every result carries the already-summed parameters; its metrics are the site's own
        self._train[server_round] = dict(_site(res.metrics) for _, res in results)
        self._dropped[server_round] = [
            {"site": "unknown-site", "phase": "train", "reason": _reason(f)} for f in failures
        ]
        return super().aggregate_fit(server_round, results, failures)

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        evaluated = dict(_site(res.metrics) for _, res in results)
        dropped = self._dropped.pop(server_round, []) + [
            {"site": "unknown-site", "phase": "evaluate", "reason": _reason(f)} for f in failures
        ]
        self._record(server_round, site_rounds(self._train.pop(server_round, {}), evaluated), dropped)
        return super().aggregate_evaluate(server_round, results, failures)


def _reason(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    _, res = failure
    return getattr(getattr(res, "status", None), "message", "") or "no reply"


def run_secure_aggregation(
    grid: Grid,
    context: Context,
    cfg: Config,
    initial: dict[str, np.ndarray],
    *,
    tracker: RunTracker,
    num_rounds: int,
    start_round: int,
    evaluate_test: EvaluateTest,
) -> dict[str, np.ndarray]:
    """Run ``num_rounds`` rounds of FedAvg under SecAgg+; returns the final global weights (name -> array)."""
    names = list(initial)
    latest: dict[str, dict[str, np.ndarray]] = {"arrays": dict(initial)}
    pending: dict[int, tuple[dict[str, float] | None, dict[str, np.ndarray], float]] = {}

    def evaluate_fn(server_round: int, ndarrays: list[np.ndarray], _config: dict[str, Scalar]) -> tuple[float, dict]:
        started = time.perf_counter()
        state = dict(zip(names, ndarrays, strict=True))
        latest["arrays"] = state
        test, _ = evaluate_test(state)
        server_s = time.perf_counter() - started
        if server_round == 0:
            tracker.add_compute(server_s)
        else:
            pending[server_round] = (test, state, server_s)
        return float((test or {}).get("loss", math.nan)), {}

    def record(server_round: int, sites: dict[str, SiteRound], dropped: list[dict[str, str]]) -> None:
        test, state, server_s = pending.pop(server_round)
        tracker.record_round(
            server_round + start_round, sites=sites, test=test, arrays=state, server_s=server_s, dropped=dropped
        )

    n = cfg.federation.hospitals
    strategy = _RecordingFedAvg(
        record=record,
        fraction_fit=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_fit_clients=cfg.strategy.min_train_nodes,
        min_evaluate_clients=cfg.strategy.min_evaluate_nodes,
        min_available_clients=cfg.strategy.min_available_nodes,
        initial_parameters=ndarrays_to_parameters(list(initial.values())),
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {keys.SERVER_ROUND: r + start_round},
        on_evaluate_config_fn=lambda r: {keys.SERVER_ROUND: r + start_round},
    )
    shares, threshold = secagg_parameters(cfg)
    logger.info("SecAgg+ with %d hospitals: %d shares, reconstruction threshold %d", n, shares, threshold)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=cfg.privacy.secagg_max_weight
        )
    )
    workflow(grid, legacy)
    return latest["arrays"]

