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
from flwr.common import EvaluateRes, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from medfed.common import keys
from medfed.common.config import Config, DistributedDPConfig
from medfed.common.distributed_plan import DistributedPlan, plan_distributed
from medfed.server.distributed_dp import RoundDiscarded, apply_step, check_participation
from medfed.server.tracking import RunTracker, SiteRound, site_rounds

__all__ = ["distributed_assumptions", "run_secure_aggregation", "secagg_parameters"]

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
        self.stopped = False  # early stopping (train.patience): later rounds ask no hospital

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return [] if self.stopped else super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return [] if self.stopped else super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._note_fit(server_round, results, failures)
        return super().aggregate_fit(server_round, results, failures)

    def _note_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]) -> None:
        # under SecAgg+ every result carries the already-summed parameters; its metrics are the site's own
        self._train[server_round] = dict(_site(res.metrics) for _, res in results)
        # (Flower 1.41's SecAgg+ workflow lists each failure of its masking stage twice: each reason once here)
        self._dropped[server_round] = [
            {"site": "unknown-site", "phase": "train", "reason": reason}
            for reason in dict.fromkeys(_reason(f) for f in failures)
        ]

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        evaluated = dict(_site(res.metrics) for _, res in results)
        dropped = self._dropped.pop(server_round, []) + [
            {"site": "unknown-site", "phase": "evaluate", "reason": _reason(f)} for f in failures
        ]
        self._record(server_round, site_rounds(self._train.pop(server_round, {}), evaluated), dropped)
        return super().aggregate_evaluate(server_round, results, failures)


class _DistributedDPStep(_RecordingFedAvg):
    """Flower's legacy FedAvg whose round result is one SGD step along the noised gradient sum SecAgg+ reveals
    (``privacy=distributed_dp``): decoded to integers, checked for participation, divided by the scale and the
    round's expected number of images, and applied with the recipe's learning rate and momentum (server-side:
    post-processing, free of privacy cost). A round with more hospitals missing than ``privacy.max_dropouts`` is
    discarded (the global model stays as it was) and recorded as such."""

    def __init__(self, *, plan: DistributedPlan, cfg: Config, initial: dict[str, np.ndarray], trainable: list[str],
                 start_round: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan, self.cfg, self.trainable, self.start_round = plan, cfg, trainable, start_round
        assert isinstance(cfg.privacy, DistributedDPConfig)
        self.max_dropouts = cfg.privacy.max_dropouts
        self.current = dict(initial)
        self.velocity = np.zeros(plan.dim)
        self.counts: dict[str, float] = {}  # each hospital's (noised) training-set size, as it sent it

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._note_fit(server_round, results, failures)
        sites = [_site(res.metrics) for _, res in results]
        for site_id, metrics in sites:
            count = metrics.get(keys.NOISED_TRAIN_COUNT, metrics.get(keys.N_TRAIN))
            if count is not None:
                self.counts[site_id] = max(1.0, count)
        overflow = sum(int(m.get(keys.INTEGER_OVERFLOW, 0)) for _, m in sites)
        if overflow:
            logger.warning("round %d: %d values lay outside the SecAgg+ integer range and were clipped; a larger "
                           "privacy.max_site_images plans a coarser scale whose sums fit",
                           server_round + self.start_round, overflow)
        try:
            if len(results) > self.plan.hospitals:
                raise RoundDiscarded(
                    f"{len(results)} hospitals are in the sum, more than federation.hospitals={self.plan.hospitals} "
                    "that the integer range and the noise shares were planned for; the round is discarded. Set "
                    "federation.hospitals to the number of hospitals in the run.")
            check_participation(sampled=self.plan.hospitals, active=len(results), max_dropouts=self.max_dropouts)
            expected = self._expected_images([site_id for site_id, _ in sites])
            mean = parameters_to_ndarrays(results[0][1].parameters)[0]
            total = self.plan.transport.decode(mean, len(results))
        except RoundDiscarded as exc:
            logger.warning("round %d discarded: %s", server_round + self.start_round, exc)
            self._dropped[server_round].append({"site": "all", "phase": "aggregate", "reason": str(exc)})
            return ndarrays_to_parameters(list(self.current.values())), {}
        gradient = total.astype(np.float64) / (self.plan.scale * expected)
        momentum = self.cfg.train.momentum if self.cfg.train.optimizer == "sgd" else 0.0
        self.velocity = momentum * self.velocity + gradient
        lr = self.cfg.train.round_lr(server_round + self.start_round)
        self.current = apply_step(self.current, self.trainable, self.velocity, lr=lr)
        return ndarrays_to_parameters(list(self.current.values())), {}

    def _expected_images(self, active: list[str]) -> float:
        """The round's expected number of images: the sampling rate times the active hospitals' training-set sizes
        (as sent; a hospital that sent none counts as the mean of the others)."""
        known = [self.counts[s] for s in active if s in self.counts]
        if not known:
            raise RoundDiscarded("no hospital in the sum has sent its training-set size yet, so the sum cannot be "
                                 "turned into a mean gradient; the round is discarded.")
        mean = sum(known) / len(known)
        return self.plan.sample_rate * sum(self.counts.get(s, mean) for s in active)


def _reason(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    _, res = failure
    return getattr(getattr(res, "status", None), "message", "") or "no reply"


def distributed_assumptions(cfg: Config, plan: DistributedPlan) -> dict[str, float | int | str]:
    """What a distributed-DP run's epsilons rest on, for the summary and the report."""
    dp = cfg.privacy
    assert isinstance(dp, DistributedDPConfig)
    return {
        "mechanism": "distributed Skellam noise under SecAgg+ (DP-FedSGD)",
        "hospitals": plan.hospitals, "max_dropouts": dp.max_dropouts, "max_colluding": dp.max_colluding,
        "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "scale": plan.scale,
        "clip": plan.clip, "trainable_weights": plan.dim, "modulus_bits": dp.modulus_bits,
        "trust": (f"each hospital's epsilon holds while at most {dp.max_dropouts} hospital(s) drop from a round's "
                  f"sum and at most {dp.max_colluding} hand their noise shares to the coordinator; the coordinator "
                  "runs SecAgg+ as Flower implements it (it sees only the sum)"),
    }


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
    trainable: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``num_rounds`` rounds of FedAvg under SecAgg+ (``privacy=distributed_dp``: one noised gradient step per
    round over the ``trainable`` weights); returns the final global weights (name -> array)."""
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
        strategy.stopped = tracker.stopped_early is not None

    n = cfg.federation.hospitals
    common: dict[str, Any] = {
        "record": record,
        "fraction_fit": cfg.strategy.fraction_train,
        "fraction_evaluate": cfg.strategy.fraction_evaluate,
        "min_fit_clients": cfg.strategy.min_train_nodes,
        "min_evaluate_clients": cfg.strategy.min_evaluate_nodes,
        "min_available_clients": cfg.strategy.min_available_nodes,
        "initial_parameters": ndarrays_to_parameters(list(initial.values())),
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": lambda r: {keys.SERVER_ROUND: r + start_round},
        "on_evaluate_config_fn": lambda r: {keys.SERVER_ROUND: r + start_round},
    }
    shares, threshold = secagg_parameters(cfg)
    logger.info("SecAgg+ with %d hospitals: %d shares, reconstruction threshold %d", n, shares, threshold)
    strategy: _RecordingFedAvg
    if isinstance(cfg.privacy, DistributedDPConfig):
        names_trained = list(trainable or [])
        plan = plan_distributed(cfg, sum(initial[name].size for name in names_trained))
        logger.info("distributed DP: noise multiplier %.4g in the sum (%d hospitals, up to %d missing, up to %d "
                    "colluding), scale %g, sampling rate %g, %d trainable weights", plan.noise_multiplier, n,
                    cfg.privacy.max_dropouts, cfg.privacy.max_colluding, plan.scale, plan.sample_rate, plan.dim)
        tracker.note_distributed_privacy(distributed_assumptions(cfg, plan))
        strategy = _DistributedDPStep(plan=plan, cfg=cfg, initial=initial, trainable=names_trained,
                                      start_round=start_round, **common)
        transport = plan.transport
        fit_workflow = SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
            clipping_range=transport.clipping_range, quantization_range=transport.quantization_range,
            modulus_range=transport.modulus_range)
    else:
        strategy = _RecordingFedAvg(**common)
        fit_workflow = SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=cfg.privacy.secagg_max_weight)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=fit_workflow)
    workflow(grid, legacy)
    return latest["arrays"]

