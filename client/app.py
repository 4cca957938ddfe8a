"""The Flower ClientApp of a hospital: translates Messages to plain Python and back, nothing else.

Each handler resolves the node's environment once (:class:`~medfed.client.node.NodeEnv`: simulated partition or
deployed site, state directory, caps, policy, output directories), has the site's policy admit the request
(:class:`~medfed.client.policy.SitePolicy`, before any data is read), checks the site's hardware
(:mod:`~medfed.client.preflight`: its device, and a model too big for its memory refused before anything trains),
reads the model and the request out of the Message, and calls the job: :func:`~medfed.client.local_round.train_round`, :func:`~medfed.client.evaluation.evaluate_round`
or :func:`~medfed.client.evaluation.final_stage`. No helper below this module sees a Message or a Context; what a
node keeps between messages reaches them through :class:`_ContextState`.

What a reply may carry is fixed here: the model's weights (``ArrayRecord``), scalar metrics (``MetricRecord``:
sample counts, losses, validation metrics, timings) and the site id (``ConfigRecord``; in simulation on Ray also
the Ray node that computed it, :mod:`~medfed.client.placement`). Any exception inside the
handlers is logged in full at the site only; what Flower forwards to the server is a PHI-free one-liner
(exception type and a fixed explanation, or the text of medfed's own errors with every path and file name
replaced, :func:`~medfed.client.redact.public_text`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping

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
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.distributed_round import SecAggSettings, distributed_round
from medfed.client.evaluation import FinalStage, evaluate_round, final_stage
from medfed.client.local_round import train_round
from medfed.client.node import NodeEnv
from medfed.client.placement import simulation_placement
from medfed.client.preflight import check_hardware
from medfed.client.privacy import SitOut
from medfed.client.redact import public_text
from medfed.client.site import resolve_site
from medfed.client.training import configure_threads
from medfed.common import keys
from medfed.common.config import Config, compose_config, config_from_dict, config_to_dict, overrides_from_run_config
from medfed.common.data import SiteData
from medfed.common.errors import IncompatibleUpdateError, MedfedError
from medfed.common.models.ssl import build_task_model
from medfed.common.models.weights import load_state_dict_numpy, set_weights

__all__ = ["SiteFailure", "app", "node_config"]

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
            if isinstance(exc, SitOut):  # planned, not an error
                logger.info("sitting out this round as the run's privacy plan says")
            else:
                logger.exception("medfed error while handling a %s message", msg.metadata.message_type)
            raise SiteFailure(public_text(f"{type(exc).__name__}: {exc}")) from None  # no path leaves the site
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


class _ContextState:
    """The node's state between messages of a run (:class:`~medfed.client.node.NodeState`) over Flower's
    ``context.state``."""

    def __init__(self, context: Context) -> None:
        self._state = context.state

    def ledger_entries(self) -> str | None:
        kept = self._state.config_records.get(keys.STATE_LEDGER)
        return str(kept["entries"]) if kept is not None else None

    def set_ledger_entries(self, raw: str) -> None:
        self._state[keys.STATE_LEDGER] = ConfigRecord({"entries": raw})

    def kept_layers(self) -> dict[str, torch.Tensor] | None:
        kept = self._state.array_records.get(keys.STATE_LOCAL_LAYERS)
        return kept.to_torch_state_dict() if kept is not None else None

    def set_kept_layers(self, kept: Mapping[str, torch.Tensor]) -> None:
        self._state[keys.STATE_LOCAL_LAYERS] = ArrayRecord(dict(kept))

    def answered(self) -> list[str]:
        kept = self._state.config_records.get(keys.STATE_ANSWERED)
        return [str(k) for k in json.loads(str(kept["keys"]))] if kept is not None else []

    def set_answered(self, answered: list[str]) -> None:
        self._state[keys.STATE_ANSWERED] = ConfigRecord({"keys": json.dumps(answered)})


@dataclasses.dataclass(frozen=True)
class _Request:
    """What a message asks, read before any site data: the run's config, the node's environment, the server
    round, and, for SecAgg+ runs, Flower's legacy instruction (converted once)."""

    cfg: Config
    env: NodeEnv
    server_round: int
    legacy: FitIns | EvaluateIns | None


def _request(msg: Message, context: Context) -> _Request:
    """The request a message makes (nothing of the site read yet)."""
    env = NodeEnv.resolve(context.node_config, context.run_config)
    cfg = env.recipe(node_config(context))  # the site's hardware keys override the recipe's
    legacy = _legacy_instruction(msg)
    if legacy is not None:  # SecAgg+ runs: Flower's legacy workflow keeps the round in its own config
        return _Request(cfg, env, int(legacy.config.get(keys.SERVER_ROUND, 0)), legacy)
    server_round = int(_number(msg.content.config_records.get(keys.CONFIG), keys.SERVER_ROUND, 0))
    return _Request(cfg, env, server_round, None)


def _load(msg: Message, request: _Request) -> tuple[SiteData, torch.nn.Module]:
    """The node's data and the received model (after the site's policy admitted the request)."""
    cfg, env = request.cfg, request.env
    if env.threads is not None:  # a deployed hospital decides its own CPU use
        configure_threads(env.threads, 1)
    else:  # a simulated one: federation.threads, else the CPUs Ray reserves it, else the cores shared by the trainers
        cpus = int(cfg.federation.cpus_per_hospital)
        configure_threads(cfg.federation.threads or max(0, cpus), cfg.federation.parallel)
    site = resolve_site(cfg, env)
    model = build_task_model(
        cfg, spatial_dims=site.info.spatial_dims, in_channels=site.info.channels, n_classes=site.info.n_classes
    )
    split = site.train if len(site.train) else site.val
    if len(split):  # its device, and a model too big for its memory refused before anything trains
        check_hardware(cfg, env, model, tuple(split.images.shape[1:]))
    if request.legacy is not None:  # SecAgg+ runs: Flower's legacy workflow sends the weights as an unnamed list
        set_weights(model, parameters_to_ndarrays(request.legacy.parameters))
        return site, model
    arrays = msg.content.array_records.get(keys.ARRAYS)
    if arrays is None:
        raise IncompatibleUpdateError(
            f"The {msg.metadata.message_type} message carries no {keys.ARRAYS!r} ArrayRecord; the coordinator "
            "must send the global model (is it running another medfed version?)."
        )
    load_state_dict_numpy(model, {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()})
    return site, model


def _number(config: ConfigRecord | None, key: str, default: float) -> float:
    """A number the coordinator sent in a ConfigRecord; ``default`` when the record or the key is absent."""
    value = config.get(key, default) if config is not None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise IncompatibleUpdateError(
            f"The coordinator sent {key!r} as a {type(value).__name__}; this hospital expects a number (is the "
            "coordinator running another medfed version?)."
        )
    return float(value)


def _legacy_instruction(msg: Message) -> FitIns | EvaluateIns | None:
    """The FitIns/EvaluateIns of a message from Flower's legacy workflow (used for SecAgg+), else None."""
    if _LEGACY_FIT in msg.content.array_records:
        return compat.recorddict_to_fitins(msg.content, keep_input=True)
    if _LEGACY_EVALUATE in msg.content.array_records:
        return compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    return None


def _reply(
    msg: Message, site: SiteData, metrics: Mapping[str, float | int | list[float]],
    weights: dict[str, torch.Tensor] | None,
) -> Message:
    """The reply: the model's weights (train, in state-dict order), scalar metrics and the site id; in the legacy
    layout for SecAgg+ rounds (scalars only: the final stages, whose sums are lists, always use the Message layout)."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    if _LEGACY_FIT in msg.content.array_records and weights is not None:
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([w.numpy() for w in weights.values()]),
            num_examples=int(scalars[keys.NUM_EXAMPLES]),
            metrics={**scalars, keys.SITE_ID: site.site_id},
        )
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    if _LEGACY_EVALUATE in msg.content.array_records:
        evaluateres = EvaluateRes(
            status=Status(code=Code.OK, message=""),
            loss=float(scalars.get(f"{keys.EVAL_PREFIX}loss", math.nan)),
            num_examples=int(scalars[keys.NUM_EXAMPLES]),
            metrics={**scalars, keys.SITE_ID: site.site_id},
        )
        return Message(content=compat.evaluateres_to_recorddict(evaluateres), reply_to=msg)
    content = RecordDict()
    if weights is not None:
        content[keys.ARRAYS] = ArrayRecord(weights)
    record: dict[str, int | float | list[int] | list[float]] = {**metrics}
    content[keys.METRICS] = MetricRecord(record)
    content[keys.SITE] = ConfigRecord({keys.SITE_ID: site.site_id, **simulation_placement()})
    return Message(content=content, reply_to=msg)


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """A train message: the global model trained on this hospital's training split (:func:`train_round`)."""
    request = _request(msg, context)
    cfg, env, server_round = request.cfg, request.env, request.server_round
    env.policy.admit_train(cfg)  # the site's policy first: a refused round reads and spends nothing
    site, model = _load(msg, request)
    if cfg.privacy.name == "distributed_dp":  # integers plus a noise share, only ever through SecAgg+
        contribution = distributed_round(cfg, site, model, env, _ContextState(context), run_id=msg.metadata.run_id,
                                         server_round=server_round, secagg=_secagg_settings(msg, context),
                                         feature_cache=env.state_dir / "features")
        return _reply(msg, site, contribution.metrics, {"sum": torch.from_numpy(contribution.values)})
    config = msg.content.config_records.get(keys.CONFIG)
    mu = _number(config, keys.PROXIMAL_MU, 0.0)  # FedProx's, from the strategy
    result = train_round(cfg, site, model, env, _ContextState(context), run_id=msg.metadata.run_id,
                         server_round=server_round, proximal_mu=mu)
    return _reply(msg, site, result.metrics, result.weights)


@app.evaluate()
@_guarded
def evaluate_handler(msg: Message, context: Context) -> Message:
    """An evaluate message: the global model on this hospital's validation split (:func:`evaluate_round`), or,
    after the last round, a final stage (:func:`final_stage`)."""
    request = _request(msg, context)
    cfg, env, server_round = request.cfg, request.env, request.server_round
    state, run_id = _ContextState(context), msg.metadata.run_id
    config = msg.content.config_records.get(keys.CONFIG)
    if config is not None and keys.FINAL_STAGE in config:
        stage = _final_request(config)
        grid = env.policy.admit_final_stage(cfg, state, run_id=run_id, stage=stage.stage,
                                            temperatures=stage.temperatures, temperature=stage.temperature)
        stage = dataclasses.replace(stage, temperatures=grid, gradcam=env.policy.gradcam)
        site, model = _load(msg, request)
        return _reply(msg, site, final_stage(cfg, site, model, stage, env, run_id, state), None)
    env.policy.admit_evaluate(cfg, state, run_id=run_id, server_round=server_round)
    site, model = _load(msg, request)
    return _reply(msg, site, evaluate_round(cfg, site, model, env, state, server_round, run_id), None)


def _secagg_settings(msg: Message, context: Context) -> SecAggSettings | None:
    """What Flower's SecAgg+ mod was set up with for this round, when this message came through it (the mod
    calls the handler only at its masking stage, and masks the reply); None for a message outside the protocol."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records or RECORD_KEY_STATE not in context.state.config_records:
        return None
    state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
    return SecAggSettings(sample_num=int(state.sample_num), peers=len(state.public_keys_dict),
                          clipping_range=float(state.clipping_range), target_range=int(state.target_range),
                          mod_range=int(state.mod_range), max_weight=float(state.max_weight))


def _final_request(config: ConfigRecord) -> FinalStage:
    """The final-stage request in a ConfigRecord, as plain values."""
    temperatures = config.get(keys.TEMPERATURES, [])
    if not isinstance(temperatures, list) or not all(isinstance(t, (int, float)) for t in temperatures):
        raise IncompatibleUpdateError(
            f"The coordinator sent {keys.TEMPERATURES!r} as {type(temperatures).__name__}; this hospital expects a "
            "list of numbers (is the coordinator running another medfed version?)."
        )
    return FinalStage(
        stage=str(config[keys.FINAL_STAGE]),
        temperatures=[float(t) for t in temperatures if isinstance(t, (int, float))],
        temperature=_number(config, keys.TEMPERATURE, 1.0),
    )
