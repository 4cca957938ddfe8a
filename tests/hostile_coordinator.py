"""A hostile coordinator for tests: a real Flower ``ServerApp`` whose ``main`` attacks hospitals through Flower's
Message API, and the Grid that carries its messages to real medfed ClientApps in this process.

:class:`SiteGrid` is a Flower ``Grid`` over in-process hospitals: each node has the node config its daemon writes
from its site config (:func:`medfed.client.site.node_config_for`) and a Flower ``Context`` per run, and every
message goes to ``medfed.client.app.app`` as a SuperNode would hand it over. As in a SuperNode, an exception in the
ClientApp becomes an error reply (``"<class '...'>:<'text'>"``) and leaves the node's state as it was.

:data:`hostile` is the attacker: its ``main`` reads which attack to run from the server context's state
(``attack`` ConfigRecord: ``name`` and JSON ``params``) and writes what each hospital answered into it
(``report``: JSON), so the test asserts on exactly what left the hospitals.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfed.client.app import app as client_app
from medfed.common import keys
from medfed.common.config import compose_config, run_config_from_overrides
from medfed.common.models import build_model

__all__ = ["Hospital", "SiteGrid", "constant_model", "hostile", "run_attack"]

_CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's ErrorCode for an exception in the ClientApp


@dataclass
class Hospital:
    """A node: its id and node config, and its Flower context of each run."""

    node_id: int
    node_config: dict[str, Any]
    contexts: dict[int, Context] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SiteGrid(Grid):
    """Flower's Grid over in-process hospitals running the real medfed ClientApp (one run, one run config)."""

    def __init__(self, hospitals: list[Hospital], *, run_id: int, overrides: list[str]) -> None:
        self.hospitals = {h.node_id: h for h in hospitals}
        self.run_id = run_id
        self.run_config = run_config_from_overrides(overrides)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:  # the run is fixed at construction
        return None

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        metadata = Metadata(run_id=self.run_id, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
                            reply_to_message_id="", group_id=group_id, created_at=time.time(),
                            ttl=ttl or DEFAULT_TTL, message_type=message_type)
        return Message(content=content, metadata=metadata)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.hospitals)

    def _deliver(self, message: Message) -> Message:
        hospital = self.hospitals[message.metadata.dst_node_id]
        with hospital.lock:  # a SuperNode runs one ClientApp of a run at a time
            context = hospital.contexts.setdefault(self.run_id, Context(
                run_id=self.run_id, node_id=hospital.node_id, node_config=hospital.node_config, state=RecordDict(),
                run_config=dict(self.run_config)))
            kept = copy.deepcopy(context.state)
            try:
                return client_app(message, context)
            except Exception as exc:  # noqa: BLE001 - what a SuperNode does: the error travels, the state does not
                context.state = kept
                return Message(Error(code=_CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                               reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._replies[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def constant_model(overrides: list[str], probability: float = 0.7) -> dict[str, np.ndarray]:
    """The class-count probe: a model whose last layer ignores the image and predicts class 1 with
    ``probability`` for every image, so an exact score histogram (or accuracy) is the class counts."""
    cfg = compose_config(overrides)
    model = build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2)
    state = model.state_dict()
    last_weight = [k for k in state if k.endswith("weight") and state[k].ndim == 2][-1]
    last_bias = last_weight[: -len("weight")] + "bias"
    state[last_weight] = torch.zeros_like(state[last_weight])
    logit = float(np.log(probability / (1 - probability)))
    state[last_bias] = torch.tensor([0.0, logit], dtype=state[last_bias].dtype)
    return {k: v.numpy() for k, v in state.items()}


_COMPOSE = threading.Lock()  # Hydra's composition is process-global: two attacks at once take turns


def _model(params: Mapping[str, Any], overrides: list[str]) -> ArrayRecord:
    with _COMPOSE:
        if params.get("constant") is not None:
            state = constant_model(overrides, float(params["constant"]))
            return ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()})
        cfg = compose_config(overrides)
        return ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())


def _answers(replies: Iterable[Message], grid: SiteGrid) -> list[dict[str, Any]]:
    """What each reply carried out of its hospital: its metrics (scalars and lists), or its error text."""
    out = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            out.append({"node": node, "error": reply.error.reason})
            continue
        metrics = reply.content.metric_records.get(keys.METRICS)
        out.append({"node": node, "metrics": {k: (list(v) if isinstance(v, list) else v)
                                              for k, v in (metrics or {}).items()},
                    "arrays": sorted(reply.content.array_records)})
    return out


hostile = ServerApp()


@hostile.main()
def attack(grid: Grid, context: Context) -> None:
    """Send the attack named in ``context.state['attack']`` to every hospital; keep what came back."""
    assert isinstance(grid, SiteGrid)
    spec = context.state.config_records["attack"]
    params = json.loads(str(spec["params"]))
    overrides = list(params["overrides"])
    arrays = _model(params, overrides)
    report: list[dict[str, Any]] = []
    for config in params["requests"]:  # each: (message type, the ConfigRecord the coordinator sends)
        messages = [grid.create_message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(config["config"])}),
                                        config["type"], node, "1") for node in grid.get_node_ids()]
        report.extend(_answers(grid.send_and_receive(messages), grid))
    context.state["report"] = ConfigRecord({"json": json.dumps(report)})


def run_attack(grid: SiteGrid, overrides: list[str], requests: list[dict[str, Any]],
               constant: float | None = None) -> list[dict[str, Any]]:
    """Run :data:`hostile` on ``grid`` with these requests; what the hospitals answered, one entry per reply."""
    context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state["attack"] = ConfigRecord({"params": json.dumps(
        {"overrides": overrides, "requests": requests, "constant": constant})})
    hostile(grid, context)
    return list(json.loads(str(context.state.config_records["report"]["json"])))


def train(server_round: int) -> dict[str, Any]:
    return {"type": MessageType.TRAIN, "config": {keys.SERVER_ROUND: server_round}}


def evaluate(server_round: int) -> dict[str, Any]:
    return {"type": MessageType.EVALUATE, "config": {keys.SERVER_ROUND: server_round}}


def final(stage: str, **config: Any) -> dict[str, Any]:
    return {"type": MessageType.EVALUATE, "config": {keys.FINAL_STAGE: stage, **config}}
