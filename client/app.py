"""The Flower ClientApp of a hospital: translates Messages to plain Python and back, nothing else.

What a reply may carry is fixed here: the model's weights (``ArrayRecord``), scalar metrics (``MetricRecord``:
sample counts, losses, validation metrics, timings) and the site id (``ConfigRecord``). Any exception inside the
handlers is logged in full at the site only; what Flower forwards to the server is a PHI-free one-liner
(exception type and a fixed explanation, or the text of medfed's own errors, which carry no patient data).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import resolve_site
from client.training import configure_threads, derive_seed, select_device, train_epochs
from common import keys
from common.config import Config, compose_config, config_from_dict, config_to_dict, overrides_from_run_config
from common.data import SiteData
from common.errors import IncompatibleUpdateError, MedfedError
from common.inference import evaluate
from common.models import build_model
from common.models.weights import load_state_dict_numpy

__all__ = ["SiteFailure", "app", "node_config"]

logger = logging.getLogger(__name__)

app = ClientApp()


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
    configure_threads(cfg.federation.threads, cfg.federation.parallel)
    site = resolve_site(cfg, context.node_config, context.run_config)
    model = build_model(
        cfg.model, spatial_dims=site.info.spatial_dims, in_channels=site.info.channels, n_classes=site.info.n_classes
    )
    arrays = msg.content.array_records.get(keys.ARRAYS)
    if arrays is None:
        raise IncompatibleUpdateError(
            f"The {msg.metadata.message_type} message carries no {keys.ARRAYS!r} ArrayRecord; the coordinator "
            "must send the global model (is it running another medfed version?)."
        )
    load_state_dict_numpy(model, {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()})
    config = msg.content.config_records.get(keys.CONFIG)
    server_round = int(config.get(keys.SERVER_ROUND, 0)) if config is not None else 0
    return cfg, site, model, server_round


def _reply(msg: Message, site: SiteData, metrics: dict[str, float | int], arrays: ArrayRecord | None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    content[keys.METRICS] = MetricRecord(metrics)
    content[keys.SITE] = ConfigRecord({keys.SITE_ID: site.site_id})
    return Message(content=content, reply_to=msg)


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's training split for ``train.local_epochs``."""
    cfg, site, model, server_round = _setup(msg, context)
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
    )
    model.cpu()
    metrics: dict[str, float | int] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.loss,
        keys.TRAIN_TIME_S: result.seconds,
        keys.N_TRAIN: len(site.train),
    }
    return _reply(msg, site, metrics, ArrayRecord(model.state_dict()))


@app.evaluate()
@_guarded
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this hospital's local validation split."""
    cfg, site, model, _ = _setup(msg, context)
    started = time.perf_counter()
    scores = evaluate(
        model, site.val.images, site.val.labels, batch_size=cfg.train.eval_batch_size, device=select_device()
    )
    seconds = time.perf_counter() - started
    metrics: dict[str, float | int] = {f"{keys.EVAL_PREFIX}{k}": float(v) for k, v in scores.items()}
    metrics.update({keys.NUM_EXAMPLES: len(site.val), keys.EVAL_TIME_S: seconds, keys.N_VAL: len(site.val)})
    return _reply(msg, site, metrics, None)
