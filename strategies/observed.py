"""A wrapper that lets the ServerApp see each hospital's reply without changing how a strategy aggregates.

``ObservedStrategy`` delegates every decision to the wrapped Flower strategy (sampling, aggregation, its state)
and records, per round, each site's scalar metrics and which hospitals failed or dropped out. Before the wrapped
strategy aggregates, it rejects updates that do not fit the global model, hold NaN/inf or are absurdly far from it
(:mod:`strategies.validation`). It also shifts the
round number by ``round_offset`` so that a resumed run continues counting where it stopped (per-round values
such as ``server-round`` stay absolute).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed.common import keys
from medfed.common.compression import CompressionError, decompress_update
from medfed.strategies.validation import check_updates

__all__ = ["ObservedStrategy", "RoundObservations", "SiteDrop", "reply_bytes"]

logger = logging.getLogger(__name__)

_STOP_REASON = "every hospital asked to train refused at its privacy cap"


@dataclass(frozen=True)
class SiteDrop:
    """A hospital that was asked to take part in a round but sent no usable reply."""

    site_id: str
    phase: str  # "train" or "evaluate"
    reason: str


@dataclass
class RoundObservations:
    """What the hospitals reported in one round, by site id."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: list[SiteDrop] = field(default_factory=list)
    # simulation on Ray: the Ray node that computed each site's reply (its training's, else its evaluation's)
    nodes: dict[str, str] = field(default_factory=dict)


def reply_bytes(msg: Message) -> int:
    """The size of a reply as it travelled: the bytes of every object Flower serialises for it (its records and
    arrays), as a hospital's audit log counts what it sends."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class ObservedStrategy(Strategy):
    """Delegate to ``inner``; remember each site's metrics and failures of the current round."""

    def __init__(self, inner: Strategy, *, round_offset: int = 0, max_update_norm_ratio: float = 10.0,
                 node_names: Mapping[int, str] | None = None, compression: str = "none") -> None:
        self.inner = inner
        self.compression = compression  # strategy.compression: how the hospitals' training replies are encoded
        # deployment: the names the coordinator registered hospitals under, for one that never replied (a
        # hospital that replied is named by the site id it sends)
        self.node_names = dict(node_names or {})
        self.round_offset = round_offset
        self.max_update_norm_ratio = max_update_norm_ratio
        self._global: ArrayRecord | None = None  # the model the current round's training started from
        self.current = RoundObservations()
        self._site_of_node: dict[int, str] = {}
        self._asked: dict[str, list[Message]] = {}  # phase -> the messages sent in the current round
        # the round in which no hospital could train any more (every one refused at its privacy cap): later rounds
        # send nothing
        self.stopped_after: int | None = None
        self._stop_reason = _STOP_REASON
        # metered DP: each site's noised training-set size (sent once per run), its FedAvg weight
        self._noised_sizes: dict[str, float] = {}

    @property
    def stop_reason(self) -> str | None:
        """Why the run stopped early, or None while it runs."""
        return self._stop_reason if self.stopped_after is not None else None

    def stop(self, after_round: int, reason: str) -> None:
        """Send nothing more after ``after_round`` (absolute), for ``reason`` (early stopping, say)."""
        if self.stopped_after is None:
            self.stopped_after, self._stop_reason = after_round, reason

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def take_observations(self) -> RoundObservations:
        """Return the observations of the round just finished and start a fresh record."""
        observed, self.current = self.current, RoundObservations()
        return observed

    def _node(self, msg: Message) -> int:
        """The hospital a reply is about: its sender, or, for the error the SuperLink sends in place of the reply
        of a hospital that went offline, the hospital the instruction went to."""
        sender = msg.metadata.src_node_id
        asked = [m for messages in self._asked.values() for m in messages]
        if any(m.metadata.dst_node_id == sender for m in asked):
            return sender
        for sent in asked:
            if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return sender

    def _registered(self, node_id: int) -> str:
        return self.node_names.get(node_id) or f"node-{node_id}"

    def _site_id(self, msg: Message) -> str:
        node_id = self._node(msg)
        if not msg.has_error():
            for record in msg.content.config_records.values():
                site = record.get(keys.SITE_ID)
                if isinstance(site, str) and site:
                    self._site_of_node[node_id] = site
        return self._site_of_node.get(node_id) or self._registered(node_id)

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by site id (errors last): Flower samples nodes in random order, and float sums in a
        different order make two runs with the same seed drift apart; a fixed order makes runs reproducible."""
        return sorted(replies, key=lambda m: (m.has_error(), self._site_id(m), m.metadata.src_node_id))

    def _asking(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._asked[phase] = messages  # Flower gives each its message id when it sends them
        return messages

    def _decoded(self, replies: list[Message]) -> list[Message]:
        """The replies with compressed updates decoded to full weights (:mod:`common.compression`); a reply that is
        not the update ``strategy.compression`` says is recorded as a drop with the reason."""
        if self.compression == "none" or self._global is None:
            return replies
        reference = dict(zip(self._global.keys(), self._global.to_numpy_ndarrays(), strict=True))
        kept = []
        for msg in replies:
            record = None if msg.has_error() else msg.content.array_records.get(keys.ARRAYS)
            if record is not None:
                try:
                    weights = decompress_update(dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True)),
                                                reference, self.compression)
                except CompressionError as exc:
                    site = self._site_id(msg)
                    self.current.dropped.append(SiteDrop(site_id=site, phase="train", reason=f"update rejected: {exc}"))
                    logger.warning("%s: update rejected: %s", site, exc)
                    continue
                msg.content[keys.ARRAYS] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in weights.items()))
            kept.append(msg)
        return kept

    def _validated(self, replies: list[Message]) -> list[Message]:
        """The replies whose update may be aggregated; the others are recorded as drops with the reason."""
        if self._global is None:
            return replies
        names = list(self._global.keys())
        reference = self._global.to_numpy_ndarrays()
        candidates = [m for m in replies if not m.has_error()]
        updates = []
        for msg in candidates:
            record = next(iter(msg.content.array_records.values()), None)
            updates.append(([], []) if record is None else (list(record.keys()), record.to_numpy_ndarrays()))
        reasons = check_updates(names, reference, updates, max_norm_ratio=self.max_update_norm_ratio)
        rejected = set()
        for msg, reason in zip(candidates, reasons, strict=True):
            if reason is not None:
                rejected.add(id(msg))
                site = self._site_id(msg)
                self.current.dropped.append(SiteDrop(site_id=site, phase="train", reason=f"update rejected: {reason}"))
                logger.warning("%s: update rejected: %s", site, reason)
        return [m for m in replies if id(m) not in rejected]

    def _observe(
        self, replies: list[Message], phase: str, *, also_answered: Iterable[Message] = ()
    ) -> dict[str, dict[str, float]]:
        seen: dict[str, dict[str, float]] = {}
        answered = {self._node(m) for m in [*replies, *also_answered]}
        silent = {m.metadata.dst_node_id for m in self._asked.get(phase, [])} - answered
        for node_id in sorted(silent):  # Flower drops a message that got no reply before the round's timeout
            site = self._site_of_node.get(node_id) or self._registered(node_id)
            reason = "no reply within strategy.round_timeout_s"
            self.current.dropped.append(SiteDrop(site_id=site, phase=phase, reason=reason))
            logger.warning("%s did not complete %s: %s", site, phase, reason)
        for msg in replies:
            site = self._site_id(msg)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                self.current.dropped.append(SiteDrop(site_id=site, phase=phase, reason=reason))
                logger.warning("%s did not complete %s: %s", site, phase, reason)
                continue
            metrics: dict[str, float] = {}
            for record in msg.content.metric_records.values():
                metrics.update({k: float(v) for k, v in record.items() if not isinstance(v, list)})
            seen[site] = metrics
            for site_record in msg.content.config_records.values():
                node = site_record.get(keys.RAY_NODE)
                if isinstance(node, str) and node:
                    self.current.nodes.setdefault(site, node)
        self._asked.pop(phase, None)
        return seen

    # --- Strategy interface (delegation) ------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the wrapped strategy, with the absolute round number (nothing once the run has stopped)."""
        if self.stop_reason is not None:
            return []
        self._global = arrays
        return self._asking("train", self.inner.configure_train(server_round + self.round_offset, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject malformed or absurd updates, record each site's training metrics, then aggregate the rest with the
        wrapped strategy (in site order)."""
        if self.stop_reason is not None:
            return None, None
        received = self._ordered(replies)
        earlier_drops = len(self.current.dropped)
        sizes = {self._site_id(m): reply_bytes(m) for m in received if not m.has_error()}
        replies = self._validated(self._decoded(received))
        self.current.train = self._observe(replies, "train", also_answered=received)
        for site, metrics in self.current.train.items():  # the coordinator's measure, whatever a site claims
            metrics[keys.BYTES_UP] = float(sizes[site])
        drops = self.current.dropped[earlier_drops:]
        if received and not self.current.train and all(keys.site_refusal(d.reason) is keys.SiteRefusal.PRIVACY_BUDGET for d in drops):
            self.stopped_after = server_round + self.round_offset
            logger.warning("stopping after round %d: %s", self.stopped_after, self.stop_reason)
        self._weigh_metered(replies)
        return self.inner.aggregate_train(server_round + self.round_offset, replies)

    def _weigh_metered(self, replies: list[Message]) -> None:
        """Metered DP replies say ``num-examples`` 1 (no exact count leaves a hospital): weigh each by its site's
        noised training-set size instead (sent once per run; the mean of the known ones for a site whose size is
        not known, 1 when none is). Other replies keep their counts."""
        metered = []
        for msg in replies:
            record = None if msg.has_error() else msg.content.metric_records.get(keys.METRICS)
            if record is None or keys.N_TRAIN in record or keys.EPSILON not in record:
                continue
            site = self._site_id(msg)
            size = record.get(keys.NOISED_TRAIN_COUNT)
            if isinstance(size, (int, float)):
                self._noised_sizes[site] = max(1.0, float(size))
            metered.append((site, record))
        known = list(self._noised_sizes.values())
        fallback = sum(known) / len(known) if known else 1.0
        for site, record in metered:
            record[keys.NUM_EXAMPLES] = self._noised_sizes.get(site, fallback)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the wrapped strategy, with the absolute round number (nothing once the run has stopped)."""
        if self.stopped_after is not None and server_round + self.round_offset > self.stopped_after:
            return []
        return self._asking(
            "evaluate", self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each site's validation metrics, then aggregate with the wrapped strategy (in site order)."""
        replies = self._ordered(replies)
        self.current.evaluate = self._observe(replies, "evaluate")
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)
