"""An in-memory twin of the researcher's transport, for fast unit tests.

It offers the same methods as :class:`ZmqResearcherTransport` and still encodes and decodes
every message, so the protocol is exercised; "nodes" are plain callables that turn a request
envelope into reply envelopes, after an optional delay, on a timer thread. ``kill`` and
``revive`` play a node vanishing and coming back. Integration tests use real sockets.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedlab.errors import FedlabTransportError
from fedlab.protocol import DEFAULT_MAX_MESSAGE_BYTES, Envelope, decode, encode
from fedlab.transport.directory import NodeDirectory, NodeRecord
from fedlab.transport.zmq_researcher import MessageHandler, check_size

__all__ = ["InMemoryResearcherTransport", "NodeHandler"]

NodeHandler = Callable[[Envelope], Sequence[Envelope] | Envelope | None]


@dataclass
class _Node:
    name: str
    handler: NodeHandler
    delay: float
    alive: bool = True


class InMemoryResearcherTransport:
    def __init__(self, *, researcher_id: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.researcher_id = researcher_id or "researcher-" + uuid.uuid4().hex[:12]
        self.max_message_bytes = max_message_bytes
        self.directory = NodeDirectory()
        self._nodes: dict[str, _Node] = {}
        self._on_message: MessageHandler | None = None
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()

    def add_node(self, node_id: str, name: str, handler: NodeHandler, *, delay: float = 0.0) -> None:
        self._nodes[node_id] = _Node(name, handler, delay)
        self.directory.seen(node_id, name)

    def set_delay(self, node_id: str, delay: float) -> None:
        self._nodes[node_id].delay = delay

    def kill(self, node_id: str) -> None:
        """The node vanishes: messages to it are lost and it shows offline."""
        self._nodes[node_id].alive = False
        self.directory.offline(node_id)

    def revive(self, node_id: str) -> None:
        self._nodes[node_id].alive = True
        self.directory.seen(node_id, self._nodes[node_id].name)

    def start(self, on_message: MessageHandler) -> None:
        self._on_message = on_message

    def close(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        self._on_message = None

    def nodes(self) -> list[NodeRecord]:
        return self.directory.records()

    def send(self, node_id: str, envelope: Envelope, *, content_frame: bytes | None = None,
             on_failure: Callable[[str], None] | None = None) -> None:
        frames = encode(envelope, content_frame)
        check_size(frames, self.max_message_bytes)
        if self._on_message is None:
            raise FedlabTransportError("the in-memory transport is not started")
        node = self._nodes.get(node_id)
        if node is None:
            if on_failure is not None:
                on_failure("not connected")
            return
        if not node.alive:
            return  # lost on the wire, as with a real node that died
        timer = threading.Timer(node.delay, self._deliver, args=(node_id, node, frames))
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _deliver(self, node_id: str, node: _Node, frames: list[bytes | memoryview]) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
        if not node.alive:
            return
        replies = node.handler(decode([bytes(f) for f in frames], max_bytes=self.max_message_bytes))
        if replies is None:
            return
        if isinstance(replies, Envelope):
            replies = [replies]
        for reply in replies:
            wire = [bytes(f) for f in encode(reply)]
            handler = self._on_message
            if handler is not None and node.alive:
                handler(node_id, decode(wire, max_bytes=self.max_message_bytes))
