"""What both zmq ends share: socket options, the size check, I/O threads, a frame's connection,
closing a monitored socket."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import zmq

from fedlab.errors import FedlabProtocolError

__all__ = ["IO_THREADS_ENV", "MIN_ZMTP_TIMEOUT_MS", "check_size", "close_monitored", "io_threads", "socket_options",
           "source_fd"]

MIN_ZMTP_TIMEOUT_MS = 2000  # a connection silent this long at the libzmq level is over, however short the beat


IO_THREADS_ENV = "FEDLAB_ZMQ_IO_THREADS"


def io_threads() -> int:
    """libzmq I/O threads for a context: each connection is served (and CURVE-encrypted) by one,
    so a researcher with several nodes uses one per core, up to 8 (``$FEDLAB_ZMQ_IO_THREADS``
    overrides, for measurements). A node has one connection; it gets as many, which costs idle
    threads only."""
    given = os.environ.get(IO_THREADS_ENV, "")
    if given.isdigit() and int(given) > 0:
        return min(64, int(given))
    return max(1, min(8, os.cpu_count() or 1))


def check_size(frames: Sequence[Any], max_bytes: int) -> None:
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise FedlabProtocolError(
            f"message of {size} bytes exceeds the limit of {max_bytes} bytes; send less data per "
            "message or raise max_message_bytes on both the researcher and the nodes",
            code="too_large",
        )


def socket_options(sock: zmq.Socket[Any], heartbeat_interval: float, max_bytes: int) -> None:
    """Options shared by both ends: no linger, a frame-size backstop, ZMTP heartbeats.

    The ZMTP heartbeat (PING/PONG, answered by the peer's libzmq I/O thread) ends a connection
    that carried nothing for ``HEARTBEAT_TIMEOUT``; any data received resets it, so a large
    message in transit keeps it alive. It is what liveness is decided from, so it is never
    shorter than ``MIN_ZMTP_TIMEOUT_MS``: a loaded machine may delay an I/O thread, not for seconds.
    """
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + 1024 * 1024)
    ivl = max(int(heartbeat_interval * 1000), 100)
    timeout = max(3 * ivl, MIN_ZMTP_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout)


def source_fd(frame: zmq.Frame) -> int | None:
    """The file descriptor of the connection ``frame`` came in on (libzmq's ``ZMQ_SRCFD``)."""
    try:
        fd = int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, ValueError, TypeError):
        return None
    return fd if fd >= 0 else None


def close_monitored(sock: zmq.Socket[Any] | None, monitor: zmq.Socket[Any] | None, *, linger_ms: int = 0) -> None:
    """Close ``sock`` and the monitor socket watching it (either may be None, when opening failed half-way).

    The monitor is turned off first, so libzmq does not report the socket's own close to a monitor
    socket that is about to go; ``linger_ms`` is how long what ``sock`` still has queued may take to
    leave (a goodbye, say). The caller drops its references afterwards.
    """
    if monitor is not None:
        if sock is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass  # the socket is already closed or its monitor already off: nothing left to turn off
        monitor.close(0)
    if sock is not None:
        sock.close(linger=linger_ms)
