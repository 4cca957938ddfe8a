"""The Flower ServerApp of the coordinator: builds the strategy from config, runs rounds, records everything.

Every round: hospitals train, the strategy aggregates, hospitals evaluate the new global model on their local
validation splits (weighted and per site), the ServerApp evaluates it on the global test set when it has one
(simulation), checkpoints it and appends one line to ``RUN_DIR/metrics.jsonl``. ``resume`` continues a stopped run
from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medfed.common import keys
from medfed.common.config import CentralDPConfig, Config, DPConfig, compose_config, config_to_yaml, overrides_from_run_config
from medfed.common.data import ArrayDataset, DatasetInfo, load_dataset_info, load_test_set
from medfed.common.environment import software_versions
from medfed.common.errors import ConfigError, DatasetUnavailableError
from medfed.common.inference import evaluate
from medfed.common.models import load_checkpoint, require_dp_compatible
from medfed.common.models.ssl import build_task_model, ssl_loss
from medfed.common.representation import representation_quality
from medfed.common.models.pretrained import load_pretrained
from medfed.server.final import (
    audit_federated,
    calibrate_federated,
    final_nodes,
    operating_point,
    uncertainty_on_test_set,
)
from medfed.server.grid import PromptGrid
from medfed.server.runs import RunDirectory
from medfed.server.secure_aggregation import run_secure_aggregation
from medfed.server.tracking import RunTracker, site_rounds
from medfed.strategies import ObservedStrategy, build_strategy, with_central_dp
from medfed.strategies.server_optimizers import restore_strategy_state, strategy_state

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ServerApp()


def _state_dict(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in arrays.to_torch_state_dict().items()}


def _test_set(cfg: Config, simulation: bool, cache_dir: Path) -> tuple[DatasetInfo, ArrayDataset | None]:
    """The dataset's description and global test split: the model is built from it and evaluated on it (no test
    split when the run withholds it: ``evaluate.test_split=false``, a `medfed tune` trial).

    In deployment the coordinator holds no hospital's images; it needs the task's public test split (a MedMNIST
    test split under ``dataset.data_path``, the generated synthetic one, or a test folder). A test folder's images
    are decoded once into ``cache_dir`` and read from there a batch at a time (memory bounded by the batch).
    """
    if not cfg.evaluate.test_split and simulation:
        return load_dataset_info(cfg, cache_dir=cache_dir), None
    try:
        if not cfg.evaluate.test_split:  # a deployment's `medfed tune` trial: the public test split only describes
            # the task (classes, channels, size) to build the model; no image of it is evaluated
            return load_test_set(replace(cfg, evaluate=replace(cfg.evaluate, test_split=True)),
                                 cache_dir=cache_dir)[0], None
        return load_test_set(cfg, cache_dir=cache_dir)
    except DatasetUnavailableError as exc:
        if simulation:
            raise
        raise ConfigError(
            f"The coordinator needs the dataset's public test split to build and evaluate the global model, and "
            f"it is not available here ({exc}). Place it under dataset.data_path on the coordinator."
        ) from None


def _final_evaluation(
    grid: Grid,
    cfg: Config,
    run_dir: RunDirectory,
    model: torch.nn.Module,
    test_set: ArrayDataset | None,
    tracker: RunTracker,
    final_arrays: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Calibrate the selected model (best validation round) with the hospitals, then analyse its uncertainty on
    the test set; the summary's ``calibration`` and ``uncertainty`` sections."""
    started = time.perf_counter()
    best_round = tracker.best_round
    state = final_arrays
    if best_round is not None and run_dir.best_model_path.is_file():
        state = dict(load_checkpoint(run_dir.best_model_path)[0])
    out: dict[str, Any] = {}
    temperature = None
    if test_set is not None:  # how well the selected encoder separates the classes (any task)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        out["representation"] = representation_quality(
            model.get_submodule("encoder"), test_set.images, test_set.labels, plot=run_dir.path / "embedding.png",
            title=f"Test-set embeddings, round {best_round} (PCA)")
    if cfg.task == "ssl":  # no classifier: nothing to calibrate or to be uncertain about
        tracker.add_compute(time.perf_counter() - started)
        return out
    asked = final_nodes(grid, cfg.strategy.fraction_evaluate, cfg.strategy.min_evaluate_nodes, cfg.train.seed)
    if cfg.evaluate.final_stages:
        calibration = calibrate_federated(grid, state, timeout=cfg.strategy.round_timeout_s, node_ids=asked)
        calibration["round"] = best_round
        if cfg.evaluate.calibrate:  # (without it, the stages only carried the request for Grad-CAM maps)
            temperature = calibration["temperature"]
            out["calibration"] = calibration
        else:
            out["gradcam_saved"] = calibration.get("gradcam_saved", {})
    if cfg.evaluate.audit:  # membership inference at each hospital that allows it, against the selected model
        out["audit"] = audit_federated(grid, state, shadows=cfg.evaluate.audit_shadows,
                                       timeout=cfg.strategy.round_timeout_s, node_ids=asked)
        out["audit"]["round"] = best_round
    best = tracker.state.best
    chosen = operating_point(cfg, model, state, test_set, best.val if best is not None else {}, best_round)
    if chosen is not None:
        out["operating_point"] = chosen
    if test_set is not None:
        out["uncertainty"] = uncertainty_on_test_set(cfg, model, state, test_set, run_dir, temperature=temperature,
                                              up_to_round=tracker.last_round)
        out["uncertainty"]["round"] = best_round
    tracker.add_compute(time.perf_counter() - started)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of federated rounds (or the rest of them, when resuming)."""
    overrides = overrides_from_run_config(context.run_config)
    cfg: Config = compose_config(overrides)
    if keys.RUN_DIR not in context.run_config:
        raise ConfigError(f"Run config lacks {keys.RUN_DIR!r}; launch runs with `medfed simulate` or `medfed train`.")
    run_dir = RunDirectory(Path(str(context.run_config[keys.RUN_DIR])))
    with run_dir.exclusive():  # one writer per run: a resumed run waits for what is left of the interrupted one
        _run(grid, context, cfg, overrides, run_dir)


def _node_names(run_config: Mapping[str, Any]) -> dict[int, str]:
    """The names the coordinator registered its hospitals under (deployment), by node id."""
    raw = run_config.get(keys.RUN_NODE_NAMES)
    if not raw:
        return {}
    try:
        return {int(k): str(v) for k, v in json.loads(str(raw)).items()}
    except (ValueError, AttributeError):
        logger.warning("run config %s is not a JSON mapping of node ids to names; hospitals that never reply are "
                       "shown by node id", keys.RUN_NODE_NAMES)
        return {}


def _run(grid: Grid, context: Context, cfg: Config, overrides: list[str], run_dir: RunDirectory) -> None:
    """One session of a run: prepare, train the remaining rounds, evaluate the selected model, summarise."""
    t0 = float(context.run_config.get(keys.RUN_T0, time.time()))
    simulation = context.run_config.get(keys.RUN_MODE, "simulation") == "simulation"
    grid = _faster_grid(grid, simulation)
    run_dir.write_environment(software_versions())
    cfg.tracking.require_runtime()
    # decoded test images: the simulation's cache folder, in deployment the run directory's own
    cache_dir = Path(str(context.run_config.get(keys.RUN_CACHE_DIR) or run_dir.path / "cache"))
    info, test_set = _test_set(cfg, simulation, cache_dir)
    model = _initial_model(cfg, info, simulation, resume=bool(context.run_config.get(keys.RUN_RESUME)))
    start_round, tracker_state = _resume_point(context, cfg, overrides, run_dir, model)
    tracker = RunTracker(run_dir, mode=cfg.strategy.name, total_rounds=cfg.train.rounds, t0=t0, state=tracker_state,
                         snapshots=cfg.evaluate.snapshots, tensorboard=cfg.tracking.tensorboard,
                         patience=cfg.train.patience)
    inner = _inner_strategy(cfg, tracker, run_dir, model, start_round)
    strategy = ObservedStrategy(inner, round_offset=start_round,
                                max_update_norm_ratio=cfg.strategy.max_update_norm_ratio,
                                node_names=_node_names(context.run_config),
                                compression=cfg.strategy.compression)
    rounds = _RoundRecorder(cfg, model, test_set, tracker, strategy, inner, start_round)
    # (a resumed run that had stopped early trains no further)
    remaining = 0 if tracker.stopped_early is not None else cfg.train.rounds - start_round
    final_arrays = _train(grid, context, cfg, model, strategy, rounds, tracker, remaining)
    extra: dict[str, Any] = {"stopped": strategy.stop_reason} if strategy.stop_reason is not None else {}
    extra.update(_final_evaluation(grid, cfg, run_dir, model, test_set, tracker, final_arrays))
    summary = tracker.finish(final_arrays, extra=extra or None)
    logger.info("run finished: best round %s", (summary.get("best") or {}).get("round"))


def _faster_grid(grid: Grid, simulation: bool) -> Grid:
    """The Grid, polling for replies sooner than Flower's defaults."""
    if simulation and hasattr(grid, "pull_interval"):
        # Flower's in-memory Grid polls for replies every 0.1 s; in-process polling is cheap, so poll faster
        # (measured: ~0.1 s less wall time per round with 5 hospitals).
        grid.pull_interval = 0.01
    elif not simulation:  # Flower's deployment Grid pulls replies every 3 s; the SuperLink is local, pull sooner
        grid = PromptGrid(grid)
    return grid


def _initial_model(cfg: Config, info: DatasetInfo, simulation: bool, *, resume: bool) -> torch.nn.Module:
    """The seeded initial global model (with its pretrained weights unless resuming), checked for DP."""
    torch.manual_seed(cfg.train.seed)  # the same initial global model on every run, and as in the baselines
    model = build_task_model(cfg, spatial_dims=info.spatial_dims, in_channels=info.channels, n_classes=info.n_classes)
    if cfg.model.pretrained and not resume:  # a resumed run has its checkpoint
        load_pretrained(model, cfg.model.pretrained)
    if isinstance(cfg.privacy, DPConfig):  # refused here, not on a hospital's first batch
        require_dp_compatible(model, cfg.model.name)
        if simulation:  # the simulated hospitals run here; deployed hospitals check their own machines
            cfg.privacy.require_runtime()
    return model


class _ResumePoint(NamedTuple):
    """Where this session of a run starts: after ``start_round``, with the tracker state checkpointed there."""

    start_round: int
    tracker_state: dict[str, Any] | None


def _resume_point(
    context: Context, cfg: Config, overrides: list[str], run_dir: RunDirectory, model: torch.nn.Module
) -> _ResumePoint:
    """The round this session starts after and the tracker state to continue from: a resumed run loads its last
    checkpoint into ``model`` and drops metrics lines written after it; a fresh run writes its config."""
    if not context.run_config.get(keys.RUN_RESUME):
        run_dir.write_config(config_to_yaml(cfg), overrides)
        return _ResumePoint(0, None)
    checkpoint = run_dir.load_last_checkpoint()
    if checkpoint is None:
        return _ResumePoint(0, None)
    arrays_np, meta = checkpoint
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays_np.items()})
    start_round = int(meta["round"])
    run_dir.truncate_metrics(start_round)
    logger.info("resuming %s after round %d", run_dir.path.name, start_round)
    return _ResumePoint(start_round, meta.get("tracker"))


def _inner_strategy(
    cfg: Config, tracker: RunTracker, run_dir: RunDirectory, model: torch.nn.Module, start_round: int
) -> Any:
    """The configured strategy (under central DP, wrapped in Flower's), with a resumed run's accountant and
    server optimizer state restored."""
    inner: Any = build_strategy(cfg.strategy)
    if isinstance(cfg.privacy, CentralDPConfig):
        if cfg.strategy.fraction_train < 1.0:
            raise ConfigError(
                f"privacy=central_dp accounts for every hospital in every round (no sampling amplification), but "
                f"strategy.fraction_train={cfg.strategy.fraction_train}; set strategy.fraction_train=1.0."
            )
        inner = with_central_dp(inner, cfg.privacy, cfg.federation.hospitals)
        if tracker.state.accountant_state is not None:  # resumed: keep counting where the stopped run was
            inner.accountant.load_state_dict(tracker.state.accountant_state)
    if start_round > 0:  # resumed: the server optimizer continues with the moments it had after start_round
        if restore_strategy_state(inner, run_dir.load_strategy_state(), list(model.state_dict())):
            logger.info("restored %s's server optimizer state from round %d", cfg.strategy.name, start_round)
    return inner


class _RoundRecorder:
    """Flower's ``evaluate_fn``: evaluates each new global model on the test set (simulation) and records the
    finished round with the tracker.

    Flower calls it after every round with the current model (and before round 1 with the initial one), so
    :attr:`latest` is the final model even if no round aggregated.
    """

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        test_set: ArrayDataset | None,
        tracker: RunTracker,
        strategy: ObservedStrategy,
        inner: Any,
        start_round: int,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.test_set = test_set
        self.tracker = tracker
        self.strategy = strategy
        self.inner = inner
        self.start_round = start_round
        self.device = torch.device("cpu")
        self.latest: dict[str, np.ndarray] | None = None

    def evaluate_test(self, state: dict[str, np.ndarray]) -> tuple[dict[str, float] | None, float]:
        """The global model's metrics on the test set (simulation) and the seconds it took."""
        started = time.perf_counter()
        test_metrics = None
        if self.test_set is not None:
            cfg, model, test_set = self.cfg, self.model, self.test_set
            model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
            if cfg.task == "ssl":  # the pretext loss (labels unused)
                test_metrics = {"loss": ssl_loss(model, test_set.images, batch_size=cfg.train.eval_batch_size,
                                                 seed=cfg.train.seed)}
            else:
                test_metrics = evaluate(
                    model, test_set.images, test_set.labels, batch_size=cfg.train.eval_batch_size, device=self.device
                )
        return test_metrics, time.perf_counter() - started

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        started = time.perf_counter()
        state = _state_dict(arrays)
        self.latest = state
        test_metrics, _ = self.evaluate_test(state)
        server_s = time.perf_counter() - started
        if server_round == 0:
            if self.start_round == 0:  # initial model, before any training: reported, never selected
                logger.info("initial test metrics: %s", test_metrics)
            self.tracker.add_compute(server_s)
            return None
        stopped_after = self.strategy.stopped_after
        if stopped_after is not None and server_round + self.start_round > stopped_after:
            return None  # the run has ended (no hospital can train): nothing more to record
        self._note_central_privacy()
        observed = self.strategy.take_observations()
        dropped = [{"site": d.site_id, "phase": d.phase, "reason": d.reason} for d in observed.dropped]
        self.tracker.record_round(
            server_round + self.start_round,
            sites=site_rounds(observed.train, observed.evaluate, nodes=observed.nodes),
            test=test_metrics,
            arrays=state,
            server_s=server_s,
            dropped=dropped,
            strategy_state=strategy_state(self.inner),
        )
        if self.tracker.stopped_early is not None:  # train.patience ran out: no more rounds are sent
            self.strategy.stop(server_round + self.start_round, self.tracker.stopped_early)
        return MetricRecord({f"test-{k}": v for k, v in (test_metrics or {}).items() if math.isfinite(v)})

    def _note_central_privacy(self) -> None:
        """Central DP: Flower's accountant, one release per round."""
        spent = self.inner.privacy_spent() if isinstance(self.cfg.privacy, CentralDPConfig) else None
        if spent is not None:
            self.tracker.note_central_privacy(epsilon=spent.epsilon, delta=spent.delta,
                                              accountant_state=self.inner.accountant.state_dict())


def _train(
    grid: Grid,
    context: Context,
    cfg: Config,
    model: torch.nn.Module,
    strategy: ObservedStrategy,
    rounds: _RoundRecorder,
    tracker: RunTracker,
    remaining: int,
) -> dict[str, np.ndarray]:
    """Run the ``remaining`` rounds (under SecAgg+ when configured); returns the final global weights."""
    start_round = rounds.start_round
    if remaining > 0 and cfg.privacy.secure_aggregation:
        return run_secure_aggregation(
            grid,
            context,
            cfg,
            {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
            tracker=tracker,
            num_rounds=remaining,
            start_round=start_round,
            evaluate_test=rounds.evaluate_test,
            trainable=[name for name, p in model.named_parameters() if p.requires_grad],
        )
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=remaining,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=rounds,
            timeout=cfg.strategy.round_timeout_s,
        )
        if rounds.latest is None:
            raise RuntimeError("Flower's strategy never evaluated a global model; the run has no final model.")
        return rounds.latest
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}
