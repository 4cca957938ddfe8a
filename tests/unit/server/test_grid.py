"""PromptGrid: Flower's Grid with replies pulled every `interval` seconds instead of every 3 s."""

from __future__ import annotations

import time

from flwr.app import RecordDict
from flwr.serverapp import Grid

from medfed.server.grid import PromptGrid
from tests.conftest import instruction, reply


class SlowRepliesGrid(Grid):
    """Replies become available one pull after another (as hospitals finish at different times)."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pushed: list[str] = []

    def set_run(self, run):  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        self.pushed = [m.metadata.message_id for m in messages]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = self.pushed[: self.pulls - 1]  # nothing at the first pull, then one more each time
        out = []
        for message_id in ready:
            if message_id in message_ids:
                answer = reply(RecordDict(), src_node_id=1)
                answer.metadata.__dict__["_reply_to_message_id"] = message_id
                out.append(answer)
        return out

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - replaced by PromptGrid
        raise NotImplementedError


def _messages():
    return [instruction(RecordDict(), "train", dst_node_id=n, message_id=f"m-{n}") for n in (1, 2)]


def test_every_reply_is_collected_promptly():
    inner = SlowRepliesGrid()
    grid = PromptGrid(inner, interval=0.01)

    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(), timeout=10))

    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m-1", "m-2"]
    assert inner.pulls == 3 and time.monotonic() - started < 1.0  # Flower's Grid would have slept 2 x 3 s
    assert list(grid.get_node_ids()) == [1, 2]


def test_the_timeout_ends_the_wait_with_the_replies_so_far():
    class NeverReplies(SlowRepliesGrid):
        def pull_messages(self, message_ids):
            self.pulls += 1
            return []

    grid = PromptGrid(NeverReplies(), interval=0.01)

    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(), timeout=0.2))

    assert replies == [] and 0.2 <= time.monotonic() - started < 1.0
