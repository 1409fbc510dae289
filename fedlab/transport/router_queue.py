"""Sends on the researcher's ROUTER socket without ever blocking its loop, and without silent drops.

``ROUTER_MANDATORY`` turns a send to an unknown peer into an error, and ``NOBLOCK`` a full queue
(the peer's high-water mark, counted in messages) into ``Again``. A message that meets a full
queue waits in line behind that peer's earlier ones and is retried, in order, for
``FULL_QUEUE_SECONDS``; one that cannot leave is logged with its msg_id and its sender's
``on_failure`` is told why. Heartbeats (no msg_id) never wait: the next one will do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from fedlab.transport.outbox import Outgoing

__all__ = ["FULL_QUEUE_SECONDS", "RouterQueue"]

log = logging.getLogger("fedlab.transport")
FULL_QUEUE_SECONDS = 30.0  # a message meeting a full queue is retried this long, then dropped (and logged)
_FULL = "full"  # _try_send's answer when the peer's queue is at its high-water mark


class RouterQueue:
    """The loop thread's sender: what went, what waits, what was dropped (and told)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[float, Outgoing]] = []  # met a full queue: retried in order

    def send(self, sock: zmq.Socket[Any], item: Outgoing) -> None:
        """Send now, or put ``item`` in line behind its peer's waiting messages (heartbeats, which
        carry no msg_id, are never queued: the next one will do)."""
        if item.msg_id and any(w.peer == item.peer for _, w in self.waiting):
            self.waiting.append((time.monotonic(), item))  # keep the order per peer
            return
        failure = self._try_send(sock, item)
        if failure is _FULL:
            if item.msg_id:
                self.waiting.append((time.monotonic(), item))
        elif failure is not None:
            self._dropped(item, failure)

    def retry(self, sock: zmq.Socket[Any]) -> None:
        """Try the waiting messages again, in order per peer; drop those that waited too long."""
        waiting, self.waiting = self.waiting, []
        blocked: set[bytes] = set()
        for queued_at, item in waiting:
            failure = _FULL if item.peer in blocked else self._try_send(sock, item)
            if failure is _FULL and time.monotonic() - queued_at < FULL_QUEUE_SECONDS:
                self.waiting.append((queued_at, item))
                blocked.add(item.peer)
            elif failure is _FULL:
                self._dropped(item, f"its queue stayed full for {FULL_QUEUE_SECONDS:.0f} s")
            elif failure is not None:
                self._dropped(item, failure)

    @staticmethod
    def _try_send(sock: zmq.Socket[Any], item: Outgoing) -> str | None:
        """None if sent, ``_FULL`` if the peer's queue is full, else why it cannot be sent."""
        try:
            sock.send_multipart([item.peer, *item.frames], zmq.NOBLOCK, copy=False)
            return None
        except zmq.Again:
            return _FULL
        except zmq.ZMQError as exc:
            return "not connected" if exc.errno == zmq.EHOSTUNREACH else exc.strerror

    @staticmethod
    def _dropped(item: Outgoing, reason: str) -> None:
        if item.msg_id:
            log.info("dropped message %s to node %s: %s", item.msg_id, item.peer.decode("utf-8", "replace"), reason)
        if item.on_failure is not None:
            item.on_failure(reason)
