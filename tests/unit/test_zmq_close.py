"""close_monitored: the one way both service ends close a socket and the monitor watching it."""

from __future__ import annotations

import zmq

from fedlab.transport.zmq_common import close_monitored


def test_closes_socket_and_monitor() -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        close_monitored(sock, monitor, linger_ms=0)
        assert sock.closed and monitor.closed
    finally:
        ctx.term()  # would hang if either socket were left open


def test_accepts_what_a_half_open_start_left() -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        close_monitored(sock, None)
        assert sock.closed
        close_monitored(None, None)
    finally:
        ctx.term()


def test_socket_closed_first_still_closes_monitor() -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.close(0)
        close_monitored(sock, monitor)  # disable_monitor on a closed socket must not escape
        assert monitor.closed
    finally:
        ctx.term()
