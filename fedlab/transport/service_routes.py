"""Which attached kernel a node's message is for: the researcher service's table of requests in flight.

Every envelope a kernel sends has its own msg_id (``fedlab.researcher.requests`` makes one per
node and per attempt), and a node answers with that id as the parent of its replies and
progress events. So the service records ``msg_id -> (kernel, node)`` when it relays a request
and routes each node message by its parent: to the kernel that asked, and only when it comes
from the node that was asked. A reply (anything but an ``event``) ends the route; events leave it
open. A route also ends when its kernel detaches or dies (its requests are dropped), when its
node restarts (the new process never got the request), or after ``ttl`` seconds unanswered
(longer than any request waits: a node's ``training_timeout`` defaults to an hour).

Pure bookkeeping, no sockets: the relay owns one table and calls it from its loop thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fedlab.transport.service_link import RouteInfo

__all__ = ["DEFAULT_TTL", "Route", "RouteTable"]

DEFAULT_TTL = 3 * 3600.0
_ORPHANS = 10_000  # routes of gone kernels remembered, to name the kernel when a late reply is discarded


@dataclass(frozen=True)
class Route:
    kernel_id: str
    node_id: str
    msg_type: str
    sent_at: float


class RouteTable:
    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self._routes: dict[str, Route] = {}
        self._orphans: OrderedDict[str, Route] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def add(self, msg_id: str, kernel_id: str, node_id: str, msg_type: str, now: float | None = None) -> None:
        self._routes[msg_id] = Route(kernel_id, node_id, msg_type, time.time() if now is None else now)

    def route(self, parent_id: str | None, node_id: str, *, final: bool) -> tuple[str | None, str]:
        """(kernel id, "") for a node message that answers a request in flight, else (None, why not)."""
        if not parent_id:
            return None, "it answers no request (no parent id)"
        route = self._routes.get(parent_id)
        if route is None:
            orphan = self._orphans.get(parent_id)
            if orphan is not None:
                return None, f"it answers request {parent_id} of kernel {orphan.kernel_id}, which has gone"
            return None, f"it answers no request in flight (parent {parent_id})"
        if route.node_id != node_id:
            return None, f"it answers request {parent_id}, which was sent to {route.node_id}, not to {node_id}"
        if final:
            del self._routes[parent_id]
        return route.kernel_id, ""

    def pop(self, msg_id: str) -> Route | None:
        """End the route of ``msg_id`` (its request could not be sent)."""
        return self._routes.pop(msg_id, None)

    def drop_kernel(self, kernel_id: str) -> list[Route]:
        """End every route of a kernel that detached or died; the routes it had."""
        gone = [msg_id for msg_id, route in self._routes.items() if route.kernel_id == kernel_id]
        for msg_id in gone:
            self._orphans[msg_id] = self._routes.pop(msg_id)
        while len(self._orphans) > _ORPHANS:
            self._orphans.popitem(last=False)
        return [self._orphans[msg_id] for msg_id in gone]

    def drop_node(self, node_id: str) -> list[Route]:
        """End every route to a node that restarted: its new process never got those requests."""
        return self._drop(lambda r: r.node_id == node_id)

    def sweep(self, now: float | None = None) -> list[Route]:
        """End the routes older than ``ttl``; the routes that ended."""
        limit = (time.time() if now is None else now) - self.ttl
        return self._drop(lambda r: r.sent_at < limit)

    def _drop(self, match: Callable[[Route], bool]) -> list[Route]:
        gone = [msg_id for msg_id, route in self._routes.items() if match(route)]
        return [self._routes.pop(msg_id) for msg_id in gone]

    def in_flight(self, kernel_id: str) -> list[RouteInfo]:
        """The kernel's requests still waiting for a node, oldest first."""
        found = [RouteInfo(msg_id, r.msg_type, r.node_id, r.sent_at)
                 for msg_id, r in self._routes.items() if r.kernel_id == kernel_id]
        return sorted(found, key=lambda r: r.sent_at)
