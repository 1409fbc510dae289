"""Delivering what came over CURVE and what came sealed on the bulk connection in one order.

A sender puts each large message on its bulk link and, at the same moment, a
:class:`~fedlab.transport.bulk_messages.BulkNotice` in its CURVE queue. The receiver delivers
messages in the order of its CURVE connection: a notice stands in for its message, and the
messages that came over CURVE after it wait behind it until the sealed message has arrived,
exactly as they would wait behind a large message on a single connection. Heartbeats are never
held (liveness must not wait for a transfer). A sealed message that no notice announced is
never delivered.

When a session ends (its link closed, the CURVE connection it belongs to dropped, or a newer
session replaced it), every notice of it still waiting becomes a :class:`Lost` entry: the owner
logs it with its msg_id and fails its request, and what waited behind it moves on.

Everything here runs on the owner's zmq loop thread except :meth:`BulkInbox.link_message` and
:meth:`BulkInbox.link_closed`, which the links' receiving threads call; the loop's poller
watches :attr:`BulkInbox.fileno` for them.
"""

from __future__ import annotations

import logging
import os
import queue
from collections import deque
from dataclasses import dataclass

from fedlab.protocol import Envelope

__all__ = ["MAX_HELD", "BulkInbox", "Control", "Lost", "Ready", "Sealed"]

log = logging.getLogger("fedlab.transport")
MAX_HELD = 4096  # messages waiting behind one peer's notices; past it the oldest notice is given up
MAX_UNANNOUNCED = 8  # sealed messages per peer that arrived before (or without) their notice


@dataclass
class Control:
    """A message that came over CURVE, in its turn."""

    peer: str
    envelope: Envelope


@dataclass
class Sealed:
    """A bulk message, announced and arrived: its frames, to decode like any message."""

    peer: str
    msg_id: str
    frames: list[memoryview]


@dataclass
class Lost:
    """An announced bulk message that will not arrive."""

    peer: str
    msg_id: str
    parent_id: str | None
    reason: str


@dataclass
class _Waiting:
    session_id: bytes
    msg_id: str
    parent_id: str | None
    size: int | None = None  # what the notice said the message holds, in bytes
    frames: list[memoryview] | None = None


@dataclass
class _Arrival:
    peer: str
    session_id: bytes
    msg_id: str
    frames: list[memoryview]


@dataclass
class _Ended:
    peer: str
    session_id: bytes
    reason: str
    receiving: str | None


Ready = Control | Sealed | Lost
_Item = Control | _Waiting | Lost


class _Wake:
    """A thread-safe queue with a pipe that a zmq poller can watch."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[_Arrival | _Ended] = queue.SimpleQueue()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.closed = False

    def put(self, item: _Arrival | _Ended) -> None:
        self.queue.put(item)
        if not self.closed:
            try:
                os.write(self._write_fd, b"\0")
            except OSError:
                pass  # the pipe is full: the loop is awake already

    def drain(self) -> list[_Arrival | _Ended]:
        try:
            while os.read(self.read_fd, 65536):
                pass
        except OSError:
            pass
        items: list[_Arrival | _Ended] = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.read_fd)
            os.close(self._write_fd)


class BulkInbox:
    def __init__(self, max_held: int = MAX_HELD) -> None:
        self._wake = _Wake()
        self._lines: dict[str, deque[_Item]] = {}
        self._unannounced: dict[str, deque[tuple[bytes, str, list[memoryview]]]] = {}
        self._max_held = max_held

    @property
    def fileno(self) -> int:
        return self._wake.read_fd

    def close(self) -> None:
        self._wake.close()

    # -- links' threads ------------------------------------------------------------------------
    def link_message(self, peer: str, session_id: bytes, msg_id: str, frames: list[memoryview]) -> None:
        self._wake.put(_Arrival(peer, session_id, msg_id, frames))

    def link_closed(self, peer: str, session_id: bytes, reason: str, receiving: str | None) -> None:
        self._wake.put(_Ended(peer, session_id, reason, receiving))

    # -- loop thread ---------------------------------------------------------------------------
    def control(self, peer: str, envelope: Envelope) -> list[Ready]:
        """A message that came over CURVE: now, or after the notices ahead of it."""
        item = Control(peer, envelope)
        line = self._lines.get(peer)
        if not line:
            return [item]
        line.append(item)
        return self._trim(peer, line)

    def notice(self, peer: str, session_id: bytes, msg_id: str, parent_id: str | None, *,
               current: bool, size: int | None = None) -> list[Ready]:
        """A notice over CURVE; ``current``: its session is this peer's and its link is up.
        ``size``: the bytes it announced; a sealed message of another size is not delivered."""
        item: _Item = Lost(peer, msg_id, parent_id, "its bulk session had ended")
        if current:
            waiting = _Waiting(session_id, msg_id, parent_id, size)
            item = waiting
            early = self._unannounced.get(peer, deque())
            for i, (sid, mid, frames) in enumerate(early):
                if sid == session_id and mid == msg_id:
                    del early[i]
                    item = self._fill(peer, waiting, frames)
                    break
        line = self._lines.setdefault(peer, deque())
        line.append(item)
        return self._trim(peer, line)

    def drain(self) -> list[Ready]:
        """What the links handed over since the last call, as far as the order allows."""
        ready: list[Ready] = []
        for item in self._wake.drain():
            if isinstance(item, _Arrival):
                ready += self._arrived(item.peer, item.session_id, item.msg_id, item.frames)
            else:
                if item.receiving is not None:
                    log.warning("message %s from %s was cut off mid-transfer: %s", item.receiving, item.peer,
                                item.reason)
                ready += self.session_ended(item.peer, item.session_id, item.reason)
        return ready

    def session_ended(self, peer: str, session_id: bytes, reason: str) -> list[Ready]:
        """Every notice of ``session_id`` still waiting is lost; what waited behind them moves on."""
        early = self._unannounced.get(peer)
        if early:
            for _, mid, _ in [e for e in early if e[0] == session_id]:
                log.warning("dropped message %s from %s: it came on the bulk connection but was never announced on "
                            "the encrypted control connection", mid, peer)
            self._unannounced[peer] = deque(e for e in early if e[0] != session_id)
        line = self._lines.get(peer)
        if not line:
            return []
        for i, item in enumerate(line):
            if isinstance(item, _Waiting) and item.session_id == session_id and item.frames is None:
                line[i] = Lost(peer, item.msg_id, item.parent_id, reason)
        return self._flush(peer)

    def forget(self, peer: str) -> None:
        """A peer gone for good (its node went offline and every session ended): drop its state."""
        if not self._lines.get(peer):
            self._lines.pop(peer, None)
        self._unannounced.pop(peer, None)

    # -- internals -----------------------------------------------------------------------------
    def _arrived(self, peer: str, session_id: bytes, msg_id: str, frames: list[memoryview]) -> list[Ready]:
        line = self._lines.get(peer, deque())
        for i, item in enumerate(line):
            if isinstance(item, _Waiting) and item.frames is None and item.session_id == session_id \
                    and item.msg_id == msg_id:
                line[i] = self._fill(peer, item, frames)
                return self._flush(peer)
        early = self._unannounced.setdefault(peer, deque())
        early.append((session_id, msg_id, frames))
        if len(early) > MAX_UNANNOUNCED:
            _, dropped, _ = early.popleft()
            log.warning("dropped message %s from %s: it came on the bulk connection but its notice did not "
                        "follow on the encrypted control connection", dropped, peer)
        return []

    @staticmethod
    def _fill(peer: str, waiting: _Waiting, frames: list[memoryview]) -> _Waiting | Lost:
        size = sum(len(f) for f in frames)
        if waiting.size is not None and size != waiting.size:
            return Lost(peer, waiting.msg_id, waiting.parent_id,
                        f"it held {size} bytes where its notice announced {waiting.size}")
        waiting.frames = frames
        return waiting

    def _trim(self, peer: str, line: deque[_Item]) -> list[Ready]:
        ready = self._flush(peer)
        line = self._lines.get(peer) or deque()
        while len(line) > self._max_held:
            for i, item in enumerate(line):
                if isinstance(item, _Waiting) and item.frames is None:
                    line[i] = Lost(peer, item.msg_id, item.parent_id,
                                   f"{self._max_held} later messages were waiting behind it")
                    break
            ready += self._flush(peer)
            line = self._lines.get(peer) or deque()
        return ready

    def _flush(self, peer: str) -> list[Ready]:
        line = self._lines.get(peer)
        ready: list[Ready] = []
        while line:
            head = line[0]
            if isinstance(head, _Waiting):
                if head.frames is None:
                    break
                ready.append(Sealed(peer, head.msg_id, head.frames))
            else:
                ready.append(head)
            line.popleft()
        if not line:
            self._lines.pop(peer, None)
        return ready
