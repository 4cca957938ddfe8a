"""A Grid that collects the hospitals' replies promptly.

In a deployment Flower's ServerApp talks to the SuperLink through a Grid whose ``send_and_receive`` pulls the
replies every 3 s (a fixed sleep), so each phase of a round waits 1.5 s on average after the last hospital has
replied. :class:`PromptGrid` keeps Flower's Grid for everything (nodes, messages, push, pull) and only pulls more
often; the SuperLink runs on the same machine as the ServerApp, so a pull is a cheap local call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:  # Flower's own types, for the signatures only
    from flwr.supercore.run import Run
    from flwr.proto.node_pb2 import NodeInfo

__all__ = ["PromptGrid"]


class PromptGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` pulls every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float = 0.2) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(  # noqa: PLR0913 - Flower's signature
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull until every one has a reply or ``timeout`` seconds have passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
