"""What the researcher knows of each node: name, status and when it was last heard.

Fed by heartbeats (and any other message) from the transport thread, read from any thread;
listeners hear every status change, which is how a pending request learns of a disconnect.

Whether a node is *there* and whether it *talks* are two facts. The zmq transport knows which
connection (file descriptor) each node's messages come in on, and libzmq's I/O thread, which
needs no GIL, watches that connection with ZMTP heartbeats and reports when it ends: then the
node is offline at once (:meth:`NodeDirectory.connection_closed`). A node whose connection is
up but whose own heartbeats have stopped, because its Python is busy in pandas or torch, is
``busy``, never offline. Only a node with no known connection (the in-memory twin) is marked
offline by silence alone, in :meth:`NodeDirectory.sweep`.
A heartbeat from a new process under a known node id (its ``session`` changed) is also told
to listeners, as ``RESTARTED``: the old process's pending work is gone, and no request should
wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["BUSY", "OFFLINE", "ONLINE", "RESTARTED", "NodeDirectory", "NodeRecord"]

ONLINE = "online"
BUSY = "busy"
OFFLINE = "offline"
RESTARTED = "restarted"  # an event for listeners, never a node's status

StatusListener = Callable[[str, str], None]


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    name: str
    status: str
    last_seen: float
    first_seen: float
    heartbeat_interval: float
    session: str = ""  # the node process heard last ("" when the node does not say)
    connection: int | None = None  # the socket its messages came in on last; None when unknown or closed


class NodeDirectory:
    def __init__(self, liveness_factor: float = 3.0) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeRecord] = {}
        self._listeners: list[StatusListener] = []
        self._liveness_factor = liveness_factor

    def add_listener(self, listener: StatusListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def seen(self, node_id: str, name: str | None = None, state: str | None = None,
             interval: float | None = None, session: str | None = None, connection: int | None = None) -> None:
        """Record that ``node_id`` was heard from now, on ``connection`` if the transport knows it
        (``state`` and ``session`` from its heartbeat, if any)."""
        now = time.time()
        with self._lock:
            old = self._nodes.get(node_id)
            if old is None:
                rec = NodeRecord(node_id, name or node_id, state or ONLINE, now, now, interval or 1.0, session or "",
                                 connection)
            else:
                status = state or (old.status if old.status != OFFLINE else ONLINE)
                rec = replace(old, name=name or old.name, status=status, last_seen=now,
                              heartbeat_interval=interval or old.heartbeat_interval, session=session or old.session,
                              connection=connection if connection is not None else old.connection)
            self._nodes[node_id] = rec
            restarted = old is not None and bool(old.session) and rec.session != old.session
            changed = old is None or old.status != rec.status
            events = ([RESTARTED] if restarted else []) + ([rec.status] if changed else [])
            listeners = list(self._listeners) if events else []
        for event in events:
            for listener in listeners:
                listener(node_id, event)

    def offline(self, node_id: str) -> None:
        self._set_status(node_id, OFFLINE)

    def connection_closed(self, connection: int) -> list[str]:
        """The transport saw ``connection`` end: the nodes last heard on it are offline (returned).

        A node that has moved to a newer connection (it restarted, or reconnected) is not touched.
        """
        with self._lock:
            gone = [rec.node_id for rec in self._nodes.values() if rec.connection == connection]
            for node_id in gone:
                self._nodes[node_id] = replace(self._nodes[node_id], connection=None)
        for node_id in gone:
            self.offline(node_id)
        return gone

    def sweep(self, now: float | None = None) -> None:
        """Judge the nodes silent for longer than their liveness window (heard up to ``now``).

        Silent on a live connection: ``busy`` (its process is working and cannot beat). Silent with
        no known connection: offline.
        """
        now = time.time() if now is None else now
        with self._lock:
            stale = [
                (rec.node_id, rec.connection is None) for rec in self._nodes.values()
                if rec.status != OFFLINE
                and now - rec.last_seen > self._liveness_factor * rec.heartbeat_interval
            ]
        for node_id, unknown in stale:
            self._set_status(node_id, OFFLINE if unknown else BUSY)

    def _set_status(self, node_id: str, status: str) -> None:
        with self._lock:
            old = self._nodes.get(node_id)
            if old is None or old.status == status or old.status == OFFLINE:
                return
            self._nodes[node_id] = replace(old, status=status)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(node_id, status)

    def get(self, node_id: str) -> NodeRecord | None:
        with self._lock:
            return self._nodes.get(node_id)

    def records(self) -> list[NodeRecord]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda r: (r.name, r.node_id))

    def is_connected(self, node_id: str) -> bool:
        rec = self.get(node_id)
        return rec is not None and rec.status != OFFLINE
