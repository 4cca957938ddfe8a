"""PromptGrid: Flower's Grid with replies pulled every `interval` seconds instead of every 3 s."""

from __future__ import annotations

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


class FakeClock:
    """The grid's clock and sleep: a sleep advances the clock at once (no wall-clock timing in a unit test)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _clock(monkeypatch) -> FakeClock:
    import medfed.server.grid as grid_module

    clock = FakeClock()
    monkeypatch.setattr(grid_module, "time", clock)
    return clock


def test_every_reply_is_collected_promptly(monkeypatch):
    clock = _clock(monkeypatch)
    inner = SlowRepliesGrid()
    grid = PromptGrid(inner, interval=0.01)

    replies = list(grid.send_and_receive(_messages(), timeout=10))

    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m-1", "m-2"]
    # three pulls, two waits of the grid's interval between them (Flower's Grid would have slept 2 x 3 s)
    assert inner.pulls == 3 and clock.sleeps == [0.01, 0.01]
    assert list(grid.get_node_ids()) == [1, 2]


def test_the_timeout_ends_the_wait_with_the_replies_so_far(monkeypatch):
    class NeverReplies(SlowRepliesGrid):
        def pull_messages(self, message_ids):
            self.pulls += 1
            return []

    clock = _clock(monkeypatch)
    inner = NeverReplies()
    grid = PromptGrid(inner, interval=0.25)  # (binary fractions: the fake clock adds up exactly)

    replies = list(grid.send_and_receive(_messages(), timeout=1.0))

    # it pulled until the deadline and no longer: four waits of 0.25 s, a pull before and after each
    assert replies == [] and clock.sleeps == [0.25] * 4 and inner.pulls == 5
