"""The kernels attached to a researcher service, and how the service's loop writes to them.

``AttachedKernel`` is what the service knows of one kernel (its routing id, pid, the memory
files both sides lend each other). ``KernelSender`` sends link messages on the service's
ROUTER without ever blocking the loop: a message meeting a full queue waits in that kernel's
backlog, sent first and in order on the next turn; a kernel that stops reading (its backlog past
``MAX_BACKLOG``) or whose connection is gone is handed to ``on_unreachable``. ``WakeQueue`` is
how other threads (the nodes' transport, the finalizers of relayed buffers) give the loop work.
"""

from __future__ import annotations

import os
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from fedlab.transport.service_bulk import Borrower, Lender
from fedlab.transport.service_link import encode_link

__all__ = ["MAX_BACKLOG", "AttachedKernel", "KernelSender", "WakeQueue"]

MAX_BACKLOG = 100_000  # link messages waiting for a kernel that does not read them: then it is detached
_SENT, _FULL, _GONE = "sent", "full", "gone"


@dataclass
class AttachedKernel:
    kernel_id: str
    peer: bytes  # its routing id on the ROUTER
    pid: int
    researcher_id: str
    label: str
    connection: int | None  # the fd its messages came in on: its monitor event ends it
    attached_at: float = field(default_factory=time.time)
    borrower: Borrower | None = None  # its memory files, as mapped here (its large buffers)
    lender: Lender | None = None  # this service's files for it (the nodes' large replies)
    backlog: deque[list[Any]] = field(default_factory=deque)  # met a full queue: sent first next time

    def describe(self) -> str:
        return f"kernel {self.kernel_id} (pid {self.pid}{', ' + self.label if self.label else ''})"


class WakeQueue:
    """A queue any thread puts work in for the loop, which a pipe in its poller wakes."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, *item: Any) -> None:
        self.items.put(item)
        try:
            os.write(self._write_fd, b"\0")
        except OSError:
            pass  # full (the loop is awake anyway) or closed (stopping)

    def drain(self) -> list[tuple[Any, ...]]:
        try:
            while os.read(self.read_fd, 65536):
                pass
        except OSError:
            pass
        out = []
        while True:
            try:
                out.append(self.items.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


class KernelSender:
    """Writes link messages to attached kernels on ``sock`` (the loop thread's), never blocking."""

    def __init__(self, on_unreachable: Callable[[AttachedKernel, str], None]) -> None:
        self.sock: zmq.Socket[Any] | None = None
        self._on_unreachable = on_unreachable

    def send(self, kernel: AttachedKernel, message: Any, payload: Sequence[Any] = ()) -> None:
        """Send to ``kernel`` now, or after what already waits for it (its queue was full)."""
        frames = [kernel.peer, *encode_link(message, payload)]
        if kernel.backlog or self._try(kernel, frames) == _FULL:
            kernel.backlog.append(frames)
            if len(kernel.backlog) > MAX_BACKLOG:
                kernel.backlog.clear()
                self._on_unreachable(kernel, f"it left {MAX_BACKLOG} messages unread")

    def _try(self, kernel: AttachedKernel, frames: list[Any]) -> str:
        if self.sock is None:
            return _GONE
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return _SENT
        except zmq.Again:
            return _FULL
        except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone
            kernel.backlog.clear()
            self._on_unreachable(kernel, f"it cannot be reached ({exc.strerror})")
            return _GONE

    def flush(self, kernels: Iterable[AttachedKernel]) -> None:
        """Send what waits in each kernel's backlog, in order, until its queue is full again."""
        for kernel in kernels:
            while kernel.backlog:
                if self._try(kernel, kernel.backlog[0]) == _FULL:
                    break
                if kernel.backlog:
                    kernel.backlog.popleft()

    def raw(self, peer: bytes, message: Any) -> None:
        """One message to a peer that is not (or no longer) attached; lost if it cannot leave at once."""
        if self.sock is None:
            return
        try:
            self.sock.send_multipart([peer, *encode_link(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # it left already
