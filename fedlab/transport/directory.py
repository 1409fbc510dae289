"""What the researcher knows of each node: name, status and when it was last heard.

Fed by heartbeats (and any other message) from the transport thread, read from any thread.
A node silent for ``liveness`` seconds is marked offline by :meth:`NodeDirectory.sweep`;
listeners hear every status change, which is how a pending request learns of a disconnect.
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
             interval: float | None = None, session: str | None = None) -> None:
        """Record that ``node_id`` was heard from now (``state`` and ``session`` from its heartbeat, if any)."""
        now = time.time()
        with self._lock:
            old = self._nodes.get(node_id)
            if old is None:
                rec = NodeRecord(node_id, name or node_id, state or ONLINE, now, now, interval or 1.0, session or "")
            else:
                status = state or (old.status if old.status != OFFLINE else ONLINE)
                rec = replace(old, name=name or old.name, status=status, last_seen=now,
                              heartbeat_interval=interval or old.heartbeat_interval, session=session or old.session)
            self._nodes[node_id] = rec
            restarted = old is not None and bool(old.session) and rec.session != old.session
            changed = old is None or old.status != rec.status
            events = ([RESTARTED] if restarted else []) + ([rec.status] if changed else [])
            listeners = list(self._listeners) if events else []
        for event in events:
            for listener in listeners:
                listener(node_id, event)

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
