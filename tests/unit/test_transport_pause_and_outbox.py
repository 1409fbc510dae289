"""The node's announced pause (real zmq sockets in one process) and the outbox's batched wake-ups."""

from __future__ import annotations

import select
import socket
import threading
import time

from fedlab.transport import ZmqNodeTransport
from fedlab.transport.outbox import Outbox, Outgoing
from fedlab.transport.zmq_researcher import ZmqResearcherTransport


def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_an_announced_pause_widens_the_researchers_liveness_window_then_ends():
    address = _address()
    researcher = ZmqResearcherTransport(address, researcher_id="r", heartbeat_interval=0.1)
    node = ZmqNodeTransport(address, node_id="node-a", name="a", heartbeat_interval=0.1)
    researcher.start(lambda node_id, envelope: None)
    node.start(lambda envelope: None)
    try:
        assert _wait(lambda: researcher.directory.get("node-a") is not None)
        node.announce_pause(30.0)
        record = researcher.directory.get("node-a")
        assert _wait(lambda: researcher.directory.get("node-a").heartbeat_interval >= 10.0), record
        node.announce_pause(0.0)
        assert _wait(lambda: researcher.directory.get("node-a").heartbeat_interval == 0.1)
    finally:
        node.close()
        researcher.close()


def test_outbox_wakes_once_per_batch_and_never_loses_an_item():
    box = Outbox()
    writes = []
    original = box.wake
    box.wake = lambda: (writes.append(1), original())  # type: ignore[method-assign]
    try:
        for i in range(100):
            box.put(Outgoing(b"", [str(i).encode()]))
        assert len(writes) == 1
        assert [item.frames[0] for item in box.drain() if item] == [str(i).encode() for i in range(100)]
        box.put(Outgoing(b"", [b"after"]))  # the next put after a drain wakes the loop again
        assert len(writes) == 2

        received: list[bytes] = []

        def consumer() -> None:  # a loop like the transport's: wait for the pipe, then drain
            deadline = time.monotonic() + 5
            while len(received) < 1001 and time.monotonic() < deadline:
                if select.select([box.fileno], [], [], 0.05)[0]:
                    received.extend(item.frames[0] for item in box.drain() if item)
        thread = threading.Thread(target=consumer)
        thread.start()
        for i in range(1000):
            box.put(Outgoing(b"", [str(i).encode()]))
        thread.join(6)
        assert received == [b"after"] + [str(i).encode() for i in range(1000)]
    finally:
        box.close()
