"""Liveness that survives load (issue 14): a node's connection, not its Python, says if it is there.

A node whose process cannot beat (the GIL held by pandas or torch for minutes) must show
``busy`` and keep its pending requests; a node that is really gone (its socket closed, its
process frozen so that libzmq cannot answer ZMTP pings, or killed) must show ``offline``
within seconds and end its pending requests with a named ``MissingNode``.

The silent node here is a bare DEALER that introduces itself with one heartbeat and then says
nothing: libzmq's I/O thread still answers the researcher's ZMTP pings, exactly as it does
for a node process whose Python is starved.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import zmq
from federation import HEARTBEAT, wait_until
from hostile import envelope_frames

from fedlab import Researcher
from fedlab.protocol import Heartbeat, PingRequest
from fedlab.researcher.policies import PENDING

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SILENCE = 20 * HEARTBEAT  # six times the application's liveness window (3 beats)


def status_of(researcher: Researcher, node_id: str) -> str | None:
    frame = researcher.nodes()
    rows = frame[frame.node_id == node_id]
    return None if rows.empty else rows.iloc[0]["status"]


def silent_node(ctx: zmq.Context, address: str, node_id: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, node_id.encode())
    sock.setsockopt(zmq.HEARTBEAT_IVL, 100)  # as a node's socket does; the researcher pings too
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
    sock.connect(address)
    sock.send_multipart(envelope_frames(Heartbeat(name="silent", interval=HEARTBEAT, session="s1"), node_id))
    return sock


def test_a_connected_node_that_cannot_beat_is_busy_not_offline_and_keeps_its_request(address):
    ctx = zmq.Context()
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        sock = silent_node(ctx, address, "silent-1")
        try:
            r.wait_for_nodes(1, timeout=30)
            request = r.requests.send(PingRequest(), nodes=["silent-1"])
            wait_until(lambda: status_of(r, "silent-1") == "busy", 30, "the silent node to show busy")
            seen = set()
            until = time.monotonic() + SILENCE
            while time.monotonic() < until:  # long past the beats' window: still there, still pending
                seen.add(status_of(r, "silent-1"))
                time.sleep(0.05)
            assert seen == {"busy"}, seen
            assert request._progress["silent-1"].status == PENDING  # not ended as "disconnected"
            # now it really goes: the connection's end is seen within seconds and ends the request
            sock.close(linger=0)
            wait_until(lambda: status_of(r, "silent-1") == "offline", 10, "the closed node to show offline")
            assert request.wait().missing()["silent-1"].reason == "disconnected"
        finally:
            sock.close(linger=0)
            ctx.term()


def test_a_frozen_node_process_is_offline_within_seconds(make_nodes, address):
    (node,) = (n.start() for n in make_nodes(1))
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(1, timeout=30)
        node.signal(signal.SIGSTOP)  # libzmq in the node cannot answer pings either: the link is dead
        try:
            wait_until(lambda: status_of(r, node.node_id) == "offline", 15, "the frozen node to show offline")
        finally:
            node.signal(signal.SIGCONT)
        wait_until(lambda: status_of(r, node.node_id) == "online", 30, "the thawed node to come back")
        assert node.node_id in r.ping().replies()


def test_liveness_holds_while_the_researcher_s_python_is_busy(make_nodes, address):
    """A researcher whose own threads hog the GIL must not take its nodes for gone."""
    nodes = [n.start() for n in make_nodes(2)]
    with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
        r.wait_for_nodes(2, timeout=30)
        stop = threading.Event()
        offline: list[str] = []

        def hog() -> None:
            while not stop.is_set():
                sum(i * i for i in range(20_000))  # pure Python: holds the GIL in long stretches

        def watch() -> None:
            while not stop.is_set():
                offline.extend(n.node_id for n in nodes if status_of(r, n.node_id) == "offline")
                time.sleep(0.05)

        threads = [threading.Thread(target=hog) for _ in range(3)] + [threading.Thread(target=watch)]
        for t in threads:
            t.start()
        try:
            time.sleep(SILENCE)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert offline == []
        assert sorted(r.ping().replies()) == sorted(n.node_id for n in nodes)
