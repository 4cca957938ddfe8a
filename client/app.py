"""The Flower ClientApp of a hospital: translates Messages to plain Python and back, nothing else.

What a reply may carry is fixed here: the model's weights (``ArrayRecord``), scalar metrics (``MetricRecord``:
sample counts, losses, validation metrics, timings) and the site id (``ConfigRecord``). Any exception inside the
handlers is logged in full at the site only; what Flower forwards to the server is a PHI-free one-liner
(exception type and a fixed explanation, or the text of medfed's own errors, which carry no patient data).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.privacy import (
    LedgerEntry,
    PrivacyLedger,
    RoundPlan,
    dataset_fingerprint,
    default_state_dir,
    entries_from_state,
    entries_to_state,
    epsilon_spent,
    plan_round,
    secure_rng_problem,
    site_cap,
)
from medfed.client.personalization import (
    KeptLayersFile,
    finetune,
    keep_local_layers,
    local_layer_names,
    poison,
    restore_local_layers,
    shared_state,
)
from medfed.client.site import resolve_site
from medfed.client.training import DPTraining, configure_threads, derive_seed, select_device, train_epochs
from medfed.common import keys
from medfed.common.config import (
    Config,
    DPConfig,
    FederationConfig,
    compose_config,
    config_from_dict,
    config_to_dict,
    overrides_from_run_config,
)
from medfed.common.data import SiteData, load_test_set
from medfed.common.errors import ConfigError, IncompatibleUpdateError, MedfedError
from medfed.common.calibration import nll_sums
from medfed.common.explain import gradcam_maps, save_explanations
from medfed.common.inference import evaluate, predict_logits, predict_proba, softmax
from medfed.common.metrics import classification_metrics, reliability_sums
from medfed.common.models.ssl import MeanLoss, build_task_model, ssl_loss
from medfed.common.models.weights import load_state_dict_numpy, set_weights
from medfed.common.uncertainty import mean_proba

__all__ = ["SiteFailure", "app", "explanations_dir", "node_config"]

logger = logging.getLogger(__name__)

# record keys of the legacy (FitIns / EvaluateIns) layout Flower's SecAgg+ workflow uses
_LEGACY_FIT = "fitins.parameters"
_LEGACY_EVALUATE = "evaluateins.parameters"

def _central_dp_clipping(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod`` on the train messages of central-DP runs (they carry the clipping norm);
    every other message passes through untouched."""
    config = msg.content.config_records.get(keys.CONFIG) if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secure_aggregation(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``secaggplus_mod`` on the messages of SecAgg+ runs (they carry its stage configs); every other
    message passes through untouched."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[_secure_aggregation, _central_dp_clipping])


class SiteFailure(RuntimeError):
    """The only exception a hospital lets Flower forward to the server; its text is PHI-free by construction."""


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except MedfedError as exc:
            logger.exception("medfed error while handling a %s message", msg.metadata.message_type)
            raise SiteFailure(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - everything else stays at the site
            logger.exception("unexpected error while handling a %s message", msg.metadata.message_type)
            raise SiteFailure(
                f"{type(exc).__name__} while handling {msg.metadata.message_type}; "
                "details are in the hospital's local log."
            ) from None

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def node_config(context: Context) -> Config:
    """The run's composed config; composed with Hydra once per node and run, then kept in ``context.state``."""
    overrides = overrides_from_run_config(context.run_config)
    key = json.dumps(overrides)
    cached = context.state.config_records.get(keys.STATE_CONFIG)
    if cached is not None and cached.get("overrides") == key:
        return config_from_dict(json.loads(str(cached["config"])))
    cfg = compose_config(overrides)
    context.state[keys.STATE_CONFIG] = ConfigRecord({"overrides": key, "config": json.dumps(config_to_dict(cfg))})
    return cfg


def _setup(msg: Message, context: Context) -> tuple[Config, SiteData, torch.nn.Module, int]:
    cfg = node_config(context)
    if keys.NODE_THREADS in context.node_config:  # a deployed hospital decides its own CPU use
        configure_threads(int(float(context.node_config[keys.NODE_THREADS])), 1)
    else:
        configure_threads(cfg.federation.threads, cfg.federation.parallel)
    site = resolve_site(cfg, context.node_config, context.run_config)
    model = build_task_model(
        cfg, spatial_dims=site.info.spatial_dims, in_channels=site.info.channels, n_classes=site.info.n_classes
    )
    legacy = _legacy_instruction(msg)
    if legacy is not None:  # SecAgg+ runs: Flower's legacy workflow sends the weights as an unnamed list
        set_weights(model, parameters_to_ndarrays(legacy.parameters))
        return cfg, site, model, int(legacy.config.get(keys.SERVER_ROUND, 0))
    arrays = msg.content.array_records.get(keys.ARRAYS)
    if arrays is None:
        raise IncompatibleUpdateError(
            f"The {msg.metadata.message_type} message carries no {keys.ARRAYS!r} ArrayRecord; the coordinator "
            "must send the global model (is it running another medfed version?)."
        )
    load_state_dict_numpy(model, {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()})
    config = msg.content.config_records.get(keys.CONFIG)
    return cfg, site, model, int(config.get(keys.SERVER_ROUND, 0)) if config is not None else 0


def _legacy_instruction(msg: Message) -> FitIns | EvaluateIns | None:
    """The FitIns/EvaluateIns of a message from Flower's legacy workflow (used for SecAgg+), else None."""
    if _LEGACY_FIT in msg.content.array_records:
        return compat.recorddict_to_fitins(msg.content, keep_input=True)
    if _LEGACY_EVALUATE in msg.content.array_records:
        return compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    return None


def _reply(
    msg: Message, site: SiteData, metrics: dict[str, float | int], weights: dict[str, torch.Tensor] | None
) -> Message:
    """The reply: the model's weights (train, in state-dict order), scalar metrics and the site id; in the legacy
    layout for SecAgg+."""
    if _LEGACY_FIT in msg.content.array_records and weights is not None:
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([w.numpy() for w in weights.values()]),
            num_examples=int(metrics[keys.NUM_EXAMPLES]),
            metrics={**metrics, keys.SITE_ID: site.site_id},
        )
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    if _LEGACY_EVALUATE in msg.content.array_records:
        evaluateres = EvaluateRes(
            status=Status(code=Code.OK, message=""),
            loss=float(metrics.get(f"{keys.EVAL_PREFIX}loss", math.nan)),
            num_examples=int(metrics[keys.NUM_EXAMPLES]),
            metrics={**metrics, keys.SITE_ID: site.site_id},
        )
        return Message(content=compat.evaluateres_to_recorddict(evaluateres), reply_to=msg)
    content = RecordDict()
    if weights is not None:
        content[keys.ARRAYS] = ArrayRecord(weights)
    content[keys.METRICS] = MetricRecord(metrics)
    content[keys.SITE] = ConfigRecord({keys.SITE_ID: site.site_id})
    return Message(content=content, reply_to=msg)


def _state_dir(context: Context) -> Path:
    """The hospital's state directory: its node config decides; in simulation the researcher's run config may."""
    if keys.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[keys.NODE_STATE_DIR])).expanduser()
    if keys.NODE_PARTITION_ID in context.node_config and keys.RUN_STATE_DIR in context.run_config:
        return Path(str(context.run_config[keys.RUN_STATE_DIR])).expanduser()
    return default_state_dir()


def _record(ledger: PrivacyLedger, context: Context, entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """Add entries to the on-disk ledger and mirror the whole ledger in ``context.state``; returns every entry."""
    recorded = ledger.record(entries)
    context.state[keys.STATE_LEDGER] = ConfigRecord({"entries": entries_to_state(recorded)})
    return recorded


def _privacy_round(
    cfg: Config, dp: DPConfig, site: SiteData, msg: Message, context: Context, server_round: int
) -> tuple[RoundPlan, PrivacyLedger, bool]:
    """Plan this round under the site's cap and record it in the ledger before training (crash-safe); the bool
    says whether DP-SGD uses a cryptographically secure RNG (the recipe's ``privacy.secure_mode`` or the site's
    ``secure-rng``: either may ask, and then the site trains only if it has one)."""
    simulated = keys.NODE_PARTITION_ID in context.node_config
    # in deployment only the hospital's node config sets its cap; the coordinator's federation.* never does
    cap = site_cap(
        cfg.federation if simulated else FederationConfig(),
        context.node_config,
        int(context.node_config[keys.NODE_PARTITION_ID]) if simulated else None,  # type: ignore[arg-type]
    )
    secure = dp.secure_mode or cap.secure_rng
    problem = secure_rng_problem(select_device()) if secure else None
    if problem:  # before the ledger: a refused round spends nothing
        asked = "this hospital's site config (secure_rng: true)" if cap.secure_rng else "privacy.secure_mode=true"
        fix = ("install torchcsprng, or set secure_rng: false in site.yaml for experiments" if cap.secure_rng
               else "install torchcsprng at every hospital, or run with privacy.secure_mode=false for experiments")
        raise ConfigError(f"{asked} asks for DP noise from a cryptographically secure RNG, but {problem}; so this "
                          f"hospital does not train with privacy=dp. To train: {fix}.")
    ledger = PrivacyLedger(_state_dir(context), dataset_fingerprint(site))
    kept = context.state.config_records.get(keys.STATE_LEDGER)
    entries = ledger.record(entries_from_state(str(kept["entries"]) if kept is not None else None))
    plan = plan_round(
        dp,
        cap,
        n_train=len(site.train),
        batch_size=cfg.train.batch_size,
        local_epochs=cfg.train.local_epochs,
        rounds_left=cfg.train.rounds - server_round + 1,
        entries=entries,
        run_id=msg.metadata.run_id,
    )
    entry = LedgerEntry.new(msg.metadata.run_id, server_round, plan.noise_multiplier, plan.sample_rate, plan.steps)
    _record(ledger, context, [entry])
    return plan, ledger, secure


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's training split for ``train.local_epochs``.

    With ``privacy=dp`` the site first plans the round under its own cap (refusing with a PHI-free reason when
    the round would pass it), records the round in its ledger, then trains with Opacus DP-SGD.
    """
    cfg, site, model, server_round = _setup(msg, context)
    dp = cfg.privacy if isinstance(cfg.privacy, DPConfig) else None
    config = msg.content.config_records.get(keys.CONFIG)
    mu = float(config.get(keys.PROXIMAL_MU, 0.0)) if config is not None else 0.0  # FedProx's, from the strategy
    plan, ledger, secure = (
        _privacy_round(cfg, dp, site, msg, context, server_round) if dp is not None else (None, None, False)
    )
    received = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    local = local_layer_names(model, cfg.personalize.local_layers)
    if local:  # personalisation: this hospital's own layers over the new global model
        restore_local_layers(model, _kept_layers(context, site, server_round), local)
    result = train_epochs(
        model,
        site.train,
        cfg.train,
        epochs=cfg.train.local_epochs,
        n_classes=site.info.n_classes,
        spatial_dims=site.info.spatial_dims,
        seed=derive_seed(cfg.train.seed, server_round, site.site_id),
        lr=cfg.train.round_lr(server_round),
        device=select_device(),
        privacy=(
            DPTraining(
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                max_physical_batch_size=dp.max_physical_batch_size,
                grad_sample_mode=dp.grad_sample_mode,
                secure_mode=secure,
            )
            if dp is not None and plan is not None
            else None
        ),
        proximal_mu=mu,
        criterion=MeanLoss() if cfg.task == "ssl" else None,
    )
    model.cpu()
    if local:
        kept = keep_local_layers(model, local)
        context.state[keys.STATE_LOCAL_LAYERS] = ArrayRecord(kept)
        _kept_file(context, site).save(kept, server_round)
    weights = poison(  # a simulated attacker's update (robustness experiments); the trained weights otherwise
        shared_state(model, received, local), received, cfg.federation, _partition_id(context),
        derive_seed(cfg.train.seed, "attack", server_round),
    )
    metrics: dict[str, float | int] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.loss,
        keys.TRAIN_TIME_S: result.seconds,
        keys.N_TRAIN: len(site.train),
    }
    if dp is not None and plan is not None and ledger is not None:
        epsilon = plan.epsilon_after
        if result.steps > plan.steps:  # never expected (the ledger holds the plan): count the excess too
            logger.error("DP training took %d steps, %d planned; recording the excess", result.steps, plan.steps)
            excess = LedgerEntry.new(msg.metadata.run_id, server_round, plan.noise_multiplier, plan.sample_rate,
                                     result.steps - plan.steps)
            epsilon = epsilon_spent(_record(ledger, context, [excess]), plan.delta, dp.accountant)
        metrics.update({keys.EPSILON: epsilon, keys.DELTA: plan.delta, keys.NOISE_MULTIPLIER: plan.noise_multiplier})
    return _reply(msg, site, metrics, weights)


def _kept_file(context: Context, site: SiteData) -> KeptLayersFile:
    return KeptLayersFile.of(_state_dir(context), str(context.run_config.get(keys.RUN_DIR, "")), site.site_id)


def _kept_layers(context: Context, site: SiteData, server_round: int) -> dict[str, torch.Tensor] | None:
    """The layers this hospital keeps to itself (personalisation): from ``context.state``, or, in the first round
    after a coordinator restart or ``--resume`` (a new Flower run), from its state directory; None in round 1."""
    kept = context.state.array_records.get(keys.STATE_LOCAL_LAYERS)
    if kept is not None:
        return kept.to_torch_state_dict()
    return _kept_file(context, site).load_before(server_round)


def _partition_id(context: Context) -> int | None:
    """The simulated hospital's index, or None for a deployed hospital."""
    value = context.node_config.get(keys.NODE_PARTITION_ID)
    return None if value is None else int(value)  # type: ignore[arg-type]


@app.evaluate()
@_guarded
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this hospital's local validation split; with personalisation also
    the hospital's personalised model, and after the last round its locally fine-tuned one."""
    cfg, site, model, server_round = _setup(msg, context)
    config = msg.content.config_records.get(keys.CONFIG)
    if config is not None and keys.FINAL_STAGE in config:
        return _reply(msg, site, _final_stage(cfg, site, model, config, msg, context), None)
    started = time.perf_counter()
    if cfg.task == "ssl":  # no labels: the pretext loss on the held-out images
        scores = {"loss": ssl_loss(model, site.val.images, batch_size=cfg.train.eval_batch_size,
                                   seed=derive_seed(cfg.train.seed, "ssl-val", site.site_id)), "n": float(len(site.val))}
    else:
        scores = evaluate(
            model, site.val.images, site.val.labels, batch_size=cfg.train.eval_batch_size, device=select_device()
        )
    metrics: dict[str, float | int] = {f"{keys.EVAL_PREFIX}{k}": float(v) for k, v in scores.items()}
    if cfg.personalize.enabled:
        metrics.update(_personalised_metrics(cfg, site, model, context, server_round))
    seconds = time.perf_counter() - started
    metrics.update(
        {keys.NUM_EXAMPLES: len(site.val), keys.EVAL_TIME_S: seconds, keys.N_VAL: len(site.val),
         keys.N_TRAIN: len(site.train)}
    )
    return _reply(msg, site, metrics, None)


def _final_stage(
    cfg: Config, site: SiteData, model: torch.nn.Module, config: ConfigRecord, msg: Message, context: Context
) -> dict[str, float | int | list[float]]:
    """After the last round: the scalars of federated temperature scaling on this hospital's validation split.

    ``calibrate``: the summed NLL at each temperature of the grid. ``reliability``: the reliability sums (per
    confidence bin: images, summed confidence, correct predictions) before and after the fitted temperature, and,
    with ``evaluate.gradcam_samples``, Grad-CAM maps of validation images written to this hospital's own disk
    (only their count is sent).
    """
    started = time.perf_counter()
    stage = str(config[keys.FINAL_STAGE])
    if len(site.val) == 0:  # nothing to calibrate on: the coordinator counts this hospital out
        return {keys.NUM_EXAMPLES: 0, keys.N_VAL: 0, keys.EVAL_TIME_S: 0.0}
    logits = predict_logits(model, site.val.images, batch_size=cfg.train.eval_batch_size, device=select_device())
    labels = site.val.labels
    metrics: dict[str, float | int | list[float]] = {keys.NUM_EXAMPLES: len(site.val), keys.N_VAL: len(site.val)}
    if stage == keys.STAGE_CALIBRATE:
        temperatures = [float(t) for t in config[keys.TEMPERATURES]]  # type: ignore[union-attr]
        metrics[keys.NLL_SUMS] = [float(v) for v in nll_sums(logits, labels, temperatures)]
    elif stage == keys.STAGE_RELIABILITY:
        temperature = float(config[keys.TEMPERATURE])  # type: ignore[arg-type]
        for key, t in ((keys.RELIABILITY_BEFORE, 1.0), (keys.RELIABILITY_AFTER, temperature)):
            metrics[key] = [float(v) for v in reliability_sums(labels, softmax(logits, t)).reshape(-1)]
        if cfg.evaluate.gradcam_samples > 0:
            metrics[keys.GRADCAM_SAVED] = _save_gradcam(cfg, site, model, msg, context, temperature)
    else:
        raise IncompatibleUpdateError(
            f"Unknown final stage {stage!r}; this hospital knows {keys.STAGE_CALIBRATE!r} and "
            f"{keys.STAGE_RELIABILITY!r} (is the coordinator running another medfed version?)."
        )
    metrics[keys.EVAL_TIME_S] = time.perf_counter() - started
    return metrics


def explanations_dir(context: Context, site_id: str, run_id: int) -> Path:
    """Where this hospital keeps a run's Grad-CAM maps: in simulation the run directory's ``sites/<id>/gradcam``
    (the researcher's machine), in deployment the hospital's state directory (never the coordinator's)."""
    if _partition_id(context) is not None and keys.RUN_DIR in context.run_config:
        return Path(str(context.run_config[keys.RUN_DIR])) / "sites" / site_id / "gradcam"
    return _state_dir(context) / "explanations" / f"run-{run_id}"


def _save_gradcam(
    cfg: Config, site: SiteData, model: torch.nn.Module, msg: Message, context: Context, temperature: float
) -> int:
    """Grad-CAM maps of a seeded sample of validation images, saved at this hospital; returns how many."""
    count = min(cfg.evaluate.gradcam_samples, len(site.val))
    if count == 0:
        return 0
    rng = np.random.default_rng(derive_seed(cfg.train.seed, "gradcam", site.site_id))
    chosen = np.sort(rng.choice(len(site.val), size=count, replace=False))
    images = site.val.images[chosen]
    maps = gradcam_maps(model, images, device=select_device())
    probs = predict_proba(model, images, device=select_device(), temperature=temperature)
    out_dir = explanations_dir(context, site.site_id, msg.metadata.run_id)
    save_explanations(out_dir, images, maps, [f"val-{int(i):05d}" for i in chosen], probs)
    logger.info("saved %d Grad-CAM maps in %s", count, out_dir)
    return count


def _personalised_metrics(
    cfg: Config, site: SiteData, model: torch.nn.Module, context: Context, server_round: int
) -> dict[str, float | int]:
    """The personalised model's metrics (global + kept layers), after the last round the fine-tuned one's, and
    the ensemble's (the mean of the global model's and these models' probabilities); on the validation split, and in
    simulation also on the global test set (a deployed hospital has none)."""
    device = select_device()
    test = None
    if _partition_id(context) is not None:
        cache = context.run_config.get(keys.RUN_CACHE_DIR)
        test = load_test_set(cfg, cache_dir=Path(str(cache)) if cache else None)[1]
    members: list[tuple[np.ndarray, np.ndarray | None]] = []  # (validation, test) probabilities of each model

    def probabilities(candidate: torch.nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
        val = predict_proba(candidate, site.val.images, batch_size=cfg.train.eval_batch_size, device=device)
        tested = None if test is None else predict_proba(candidate, test.images,
                                                         batch_size=cfg.train.eval_batch_size, device=device)
        members.append((val, tested))
        return val, tested

    def scores(prefix: str, test_prefix: str, probs: tuple[np.ndarray, np.ndarray | None]) -> dict[str, float | int]:
        out = {f"{prefix}{k}": float(v) for k, v in classification_metrics(site.val.labels, probs[0]).items()}
        if test is not None and probs[1] is not None:
            out.update({f"{test_prefix}{k}": float(v)
                        for k, v in classification_metrics(test.labels, probs[1]).items()})
        return out

    def validate(candidate: torch.nn.Module) -> dict[str, float]:
        return evaluate(candidate, site.val.images, site.val.labels, batch_size=cfg.train.eval_batch_size,
                        device=device)

    metrics: dict[str, float | int] = {}
    probabilities(model)  # the global model: the ensemble's first member
    local = local_layer_names(model, cfg.personalize.local_layers)
    if local:
        restore_local_layers(model, _kept_layers(context, site, server_round + 1), local)
        metrics.update(scores(keys.PERSONAL_PREFIX, keys.PERSONAL_TEST_PREFIX, probabilities(model)))
    if cfg.personalize.finetune_epochs > 0 and server_round >= cfg.train.rounds:

        def train_one_epoch(candidate: torch.nn.Module, epoch: int) -> None:
            train_epochs(candidate, site.train, cfg.train, epochs=1, n_classes=site.info.n_classes,
                         spatial_dims=site.info.spatial_dims, seed=derive_seed(cfg.train.seed, "finetune", epoch,
                                                                               site.site_id),
                         lr=cfg.train.lr, device=device)
            candidate.cpu()

        tuned = finetune(model, cfg.personalize.finetune_epochs, train_one_epoch, validate)
        metrics.update(scores(keys.FINETUNED_PREFIX, keys.FINETUNED_TEST_PREFIX, probabilities(tuned.model)))
        metrics[keys.FINETUNED_EPOCH] = tuned.epoch
    if len(members) >= 2:
        ensemble = (mean_proba([v for v, _ in members]),
                    None if test is None else mean_proba([t for _, t in members if t is not None]))
        metrics.update(scores(keys.ENSEMBLE_PREFIX, keys.ENSEMBLE_TEST_PREFIX, ensemble))
    return metrics
