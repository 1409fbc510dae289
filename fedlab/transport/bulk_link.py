"""One authenticated bulk connection: sealed messages out on one thread, in on another.

Made by either side once the hello and welcome (``bulk_seal``) have passed. The sending thread
seals each chunk into one reusable buffer and hands it to the kernel, so a frame is read once
from the caller's memory and written once, encrypted; nothing else is copied. The receiving
thread reads each record into one reusable buffer and decrypts it straight into the message's
own buffers. Both threads block in the kernel, or in OpenSSL, without the GIL.

A link that fails (the peer closed it, a record failed its check, TCP gave up) is closed
once: every message still queued on it fails with a log line naming its msg_id and its
``on_failure`` is told, and the owner's ``on_closed`` hears which message was being received.
TCP keepalive and ``TCP_USER_TIMEOUT`` bound how long a dead peer can hold a send.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedlab.transport.bulk_seal import HEADER_BYTES, MAX_START_BODY, TAG_BYTES, Opener, Sealer, SealError

__all__ = ["BulkLink", "PeerClosed", "read_exact", "split_tcp", "tune"]

log = logging.getLogger("fedlab.transport")
USER_TIMEOUT_MS = 30_000  # unacknowledged data this long ends the connection
_SMALL = 64 << 10  # records below this are gathered into one write


def split_tcp(address: str) -> tuple[str, int] | None:
    """(host, port) of a zmq ``tcp://HOST:PORT`` address (``*`` is every interface, ``[..]`` IPv6);
    None for any other form (ipc://, a wildcard port, an interface name is left to the caller)."""
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host == "*":
        host = "0.0.0.0"  # noqa: S104 - the researcher asked for every interface, as zmq's "*" does
    return host.strip("[]"), int(port)


def tune(sock: socket.socket) -> None:
    """Keepalive, a bound on unacknowledged data and no Nagle delay, where the platform has them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class PeerClosed(ConnectionError):
    """The peer closed the connection."""


def read_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; raise :class:`PeerClosed` if the connection ends first."""
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise PeerClosed("the connection closed" + (f" after {got} of {size} bytes of a record" if got else ""))
        got += n


@dataclass
class _Send:
    msg_id: str
    frames: Sequence[Any]
    on_failure: Callable[[str], None] | None


class BulkLink:
    """Sealed messages over ``sock`` to and from the peer of session ``sealer.keys``."""

    def __init__(self, sock: socket.socket, sealer: Sealer, opener: Opener, *, peer: str,
                 on_message: Callable[[BulkLink, str, list[memoryview]], None],
                 on_closed: Callable[[BulkLink, str, str | None], None]) -> None:
        self.sock, self.sealer, self.opener, self.peer = sock, sealer, opener, peer
        self.session_id = sealer.keys.session_id
        self._on_message, self._on_closed = on_message, on_closed
        self._queue: queue.SimpleQueue[_Send | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.reason = ""
        self._sender = threading.Thread(target=self._send_loop, name="fedlab-bulk-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="fedlab-bulk-recv", daemon=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._sender.start()
        self._receiver.start()

    def send(self, msg_id: str, frames: Sequence[Any], on_failure: Callable[[str], None] | None = None) -> bool:
        """Queue a message; False (and nothing queued) if the link is closed."""
        with self._lock:
            if self._closed:
                return False
            self._queue.put(_Send(msg_id, frames, on_failure))
        return True

    def close(self, reason: str) -> None:
        """Close once: wake both threads; queued messages fail with ``reason``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.reason = reason
            self._queue.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more

    def join(self, timeout: float) -> None:
        for thread in (self._sender, self._receiver):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    # -- threads ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        out = memoryview(bytearray(HEADER_BYTES + self.sealer.chunk_bytes + TAG_BYTES))
        while True:
            item = self._queue.get()
            if item is None:
                break
            self._send_item(item, out)
            del item  # a sent model is not kept alive while the queue waits for the next one
        while True:  # the link is closed: what is still queued cannot leave
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self._fail(left, self.reason or "the bulk connection closed")

    def _send_item(self, item: _Send, out: memoryview) -> None:
        if self._closed:
            self._fail(item, self.reason)
            return
        try:
            views = [memoryview(f).cast("B") for f in item.frames]
        except (TypeError, ValueError) as exc:  # not a contiguous buffer: this message only fails
            self._fail(item, f"its frames cannot be sent ({exc})")
            return
        try:
            self._send_one(item, views, out)
        except (OSError, SealError) as exc:
            reason = f"the bulk connection failed while sending ({exc})"
            self._fail(item, reason)
            self.close(reason)  # the receiving thread wakes, and tells the owner

    def _send_one(self, item: _Send, views: list[memoryview], out: memoryview) -> None:
        """Seal and write one message. Small records (the envelope's header and content) are
        gathered with the start and written in one call; each large one is sealed into ``out``
        and written from there, while it is still in cache."""
        sealer, sock = self.sealer, self.sock
        gathered = [sealer.start(item.msg_id, [len(v) for v in views])]
        for frame, offset, size in sealer.records(item.msg_id, views):
            record = sealer.data_into(out, views[frame][offset:offset + size], item.msg_id, frame, offset)
            if size < _SMALL:
                gathered.append(bytes(record))
                continue
            if gathered:
                sock.sendall(b"".join(gathered))
                gathered = []
            sock.sendall(record)
        if gathered:
            sock.sendall(b"".join(gathered))

    def _fail(self, item: _Send, reason: str) -> None:
        log.warning("dropped message %s to %s: %s", item.msg_id, self.peer, reason)
        if item.on_failure is not None:
            try:
                item.on_failure(reason)
            except Exception:  # pragma: no cover - a failing callback must not stop the link
                log.exception("on_failure of message %s failed", item.msg_id)

    def _receive_loop(self) -> None:
        header = memoryview(bytearray(HEADER_BYTES))
        body = memoryview(bytearray(MAX_START_BODY))
        reason = "the bulk connection closed"
        try:
            while True:
                read_exact(self.sock, header)
                size = self.opener.check_header(header)
                if size > len(body):  # a chunk larger than the last: at most MAX_CHUNK_BYTES + tag
                    body = memoryview(bytearray(size))
                read_exact(self.sock, body[:size])
                done = self.opener.open(body[:size])
                if done is not None:
                    self._on_message(self, done[0], done[1])
                    del done  # the owner holds the message now, for as long as it needs it
        except PeerClosed as exc:
            reason = str(exc) if not self._closed else self.reason
        except SealError as exc:
            reason = f"refused a record from {self.peer} ({exc.reason}): {exc}"
        except OSError as exc:
            reason = self.reason if self._closed else f"the bulk connection failed ({exc.strerror or exc})"
        except Exception as exc:  # pragma: no cover - a bug here must be visible
            log.exception("bulk receive loop crashed")
            reason = f"internal error {type(exc).__name__}"
        self.close(reason)  # keeps the first reason when the link was closed already
        self._sender.join(5.0)
        self.sock.close()
        try:  # once, from here only
            self._on_closed(self, self.reason, self.opener.msg_id)
        except Exception:  # pragma: no cover - a bug in the owner must be visible, not stop the thread silently
            log.exception("on_closed of a bulk link failed")
