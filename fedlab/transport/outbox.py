"""A thread-safe outbox for a socket owned by one thread.

ZeroMQ sockets must not be shared across threads. Any thread puts frames here; the owning
loop thread is woken through a pipe (which its poller watches next to the socket) and sends
them. This keeps sends push-based: a request leaves as soon as it is queued.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Outbox", "Outgoing"]


@dataclass(frozen=True)
class Outgoing:
    """Frames for one peer; ``on_failure(reason)`` is called if they cannot be sent."""

    peer: bytes
    frames: Sequence[Any]
    on_failure: Callable[[str], None] | None = None
    msg_id: str = ""  # for the log line if it is dropped ("" for heartbeats)


class Outbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Outgoing | None] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False
        # True from a wake-up write until the next drain reads the pipe: while it is set the
        # pipe holds a byte, so a put needs no write of its own (one syscall per batch, not per message).
        self._signalled = False

    @property
    def fileno(self) -> int:
        return self._read_fd

    def put(self, item: Outgoing | None) -> None:
        self._queue.put(item)
        if not self._signalled:
            self._signalled = True
            self.wake()

    def wake(self) -> None:
        if self._closed:  # the fd number may already belong to another file
            return
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (already awake) or closed (shutting down)

    def drain(self) -> list[Outgoing | None]:
        try:
            while os.read(self._read_fd, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        self._signalled = False  # after reading the pipe, before taking the queue: no put is missed
        items: list[Outgoing | None] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)
