"""The simulation engine asks only nodes with a message waiting (simulation/polling.py); every e2e simulation runs
through it, these tests pin what it asks and that it fits the Flower it replaces a loop of."""

from __future__ import annotations

import inspect
import threading
from queue import Queue
from types import SimpleNamespace

from medfed.simulation.polling import _sparse_add_messages_to_queue, pending_nodes, sparse_polling


def _message(dst: int, delivered: str = "") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered))


class _State:
    """An in-memory LinkState's store, lock and get_message_ins (one undelivered message per call, marked)."""

    def __init__(self, messages: list[SimpleNamespace]) -> None:
        self.message_ins_store = {str(i): m for i, m in enumerate(messages)}
        self.lock = threading.RLock()
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[SimpleNamespace]:
        self.asked.append(node_id)
        for message in self.message_ins_store.values():
            if message.metadata.dst_node_id == node_id and message.metadata.delivered_at == "":
                message.metadata.delivered_at = "now"
                return [message]
        return []


def test_only_nodes_with_an_undelivered_message_are_pending():
    state = _State([_message(7), _message(3, delivered="earlier"), _message(900), _message(7)])
    assert pending_nodes(state, range(1000)) == [7, 900]
    assert pending_nodes(object(), [5, 1, 3]) == [5, 1, 3]  # no in-memory store: every node, as Flower asks


def test_one_sweep_asks_only_pending_nodes_and_queues_one_message_each():
    # Prepare: 1,000 nodes, node 7 with two messages waiting, node 900 with one
    state = _State([_message(7), _message(900), _message(7)])
    queue: Queue = Queue()
    stop = threading.Event()

    class StopAfterOneSweep(threading.Event):
        def wait(self, timeout=None):
            stop.set()
            return True

        def is_set(self):
            return stop.is_set()

    # Execute
    _sparse_add_messages_to_queue(state, queue, dict.fromkeys(range(1000), 0), StopAfterOneSweep())

    # Assert: two questions, not 1,000; one message per node per sweep (Flower's limit=1); node 7's second waits
    assert state.asked == [7, 900]
    assert [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())] == [7, 900]
    assert pending_nodes(state, range(1000)) == [7]


def test_the_loop_replaces_flowers_for_the_block_only_and_takes_its_arguments():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    assert list(inspect.signature(original).parameters) == list(
        inspect.signature(_sparse_add_messages_to_queue).parameters)  # a Flower upgrade that changes it fails here
    with sparse_polling():
        assert vce_api.add_messages_to_queue is _sparse_add_messages_to_queue
    assert vce_api.add_messages_to_queue is original
