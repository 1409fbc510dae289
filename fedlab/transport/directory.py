"""What the researcher knows of each node: name, status and when it was last heard.

Fed by heartbeats (and any other message) from the transport thread, read from any thread.
A node silent for ``liveness`` seconds is marked offline by :meth:`NodeDirectory.sweep`;
listeners hear every status change, which is how a pending request learns of a disconnect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["BUSY", "OFFLINE", "ONLINE", "NodeDirectory", "NodeRecord"]

ONLINE = "online"
BUSY = "busy"
OFFLINE = "offline"

StatusListener = Callable[[str, str], None]


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    name: str
    status: str
    last_seen: float
    first_seen: float
    heartbeat_interval: float


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
             interval: float | None = None) -> None:
        """Record that ``node_id`` was heard from now (``state`` from its heartbeat, if any)."""
        now = time.time()
        with self._lock:
            old = self._nodes.get(node_id)
            if old is None:
                rec = NodeRecord(node_id, name or node_id, state or ONLINE, now, now, interval or 1.0)
            else:
                status = state or (old.status if old.status != OFFLINE else ONLINE)
                rec = replace(old, name=name or old.name, status=status, last_seen=now,
                              heartbeat_interval=interval or old.heartbeat_interval)
            self._nodes[node_id] = rec
            changed = old is None or old.status != rec.status
            listeners = list(self._listeners) if changed else []
        for listener in listeners:
            listener(node_id, rec.status)

    def offline(self, node_id: str) -> None:
        with self._lock:
            old = self._nodes.get(node_id)
            if old is None or old.status == OFFLINE:
                return
            self._nodes[node_id] = replace(old, status=OFFLINE)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(node_id, OFFLINE)

    def sweep(self, now: float | None = None) -> None:
        """Mark offline every node silent for longer than its liveness window."""
        now = time.time() if now is None else now
        with self._lock:
            stale = [
                rec.node_id for rec in self._nodes.values()
                if rec.status != OFFLINE
                and now - rec.last_seen > self._liveness_factor * rec.heartbeat_interval
            ]
        for node_id in stale:
            self.offline(node_id)

    def get(self, node_id: str) -> NodeRecord | None:
        with self._lock:
            return self._nodes.get(node_id)

    def records(self) -> list[NodeRecord]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda r: (r.name, r.node_id))

    def is_connected(self, node_id: str) -> bool:
        rec = self.get(node_id)
        return rec is not None and rec.status != OFFLINE
