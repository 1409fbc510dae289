"""Peers that vanish mid-stream must not abort a node or a researcher (issue 14).

Each hostile peer sends random multipart messages (1-6 frames of 0-4,096 random bytes, and
now and then a frame of a megabyte, so the connection is cut in the middle of a message)
and closes its socket with ``LINGER 0`` without waiting: the TCP stream ends wherever it
was. With ``ZMQ_IMMEDIATE`` on the node's socket this aborted the node process in about one
run of three (``Assertion failed: !_more (src/fq.cpp:80)``). 100 such peers in a row, then
the node, and the researcher, must still be alive and answer a real request.
"""

from __future__ import annotations

import random
import time

import pytest
import zmq
from federation import HEARTBEAT, NodeProcess, breast_cancer_splits, wait_until

from fedlab import Researcher
from fedlab.protocol import PingReply

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PEERS = 100


def random_messages(rng: random.Random, sock: zmq.Socket, prefix: list[bytes]) -> None:
    """Send until the queue is full or the count is reached; a few frames are a megabyte."""
    for _ in range(rng.randrange(20, 400)):
        frames = [rng.randbytes(rng.choice([rng.randrange(0, 4097), 1 << 20]) if rng.random() < 0.02
                                else rng.randrange(0, 4097)) for _ in range(rng.randrange(1, 7))]
        try:
            sock.send_multipart([*prefix, *frames], zmq.NOBLOCK)
        except zmq.Again:
            return


def test_node_survives_100_hostile_researchers_that_vanish_mid_stream(tmp_path, address):
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=breast_cancer_splits(2)[0]).start()
    rng = random.Random(14)
    try:
        for i in range(PEERS):
            ctx = zmq.Context()
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(address)
            try:
                deadline = time.monotonic() + 30
                identity = b""
                while not identity:  # the node's first heartbeat on this connection names it
                    assert node.proc.poll() is None, f"node died before peer {i}:\n{node.log()[-3000:]}"
                    assert time.monotonic() < deadline, f"the node did not reconnect to peer {i}"
                    if sock.poll(100):
                        identity = sock.recv_multipart()[0]
                random_messages(rng, sock, [identity])
            finally:
                sock.close(linger=0)  # mid-stream, without a goodbye
                ctx.term()
            time.sleep(rng.random() * 0.02)
            assert node.proc.poll() is None, f"node died after peer {i}:\n{node.log()[-3000:]}"
        with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
            r.wait_for_nodes(1, timeout=30)
            reply = r.ping().replies()[node.node_id]
            assert isinstance(reply.content, PingReply)
        assert node.proc.poll() is None
        assert "Assertion failed" not in node.log()
    finally:
        node.stop()


def test_researcher_survives_100_hostile_nodes_that_vanish_mid_stream(tmp_path, address):
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=breast_cancer_splits(2)[0]).start()
    rng = random.Random(41)
    try:
        with Researcher(address, heartbeat_interval=HEARTBEAT) as r:
            r.wait_for_nodes(1, timeout=30)
            ctx = zmq.Context()
            try:
                for i in range(PEERS):
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.IDENTITY, f"hostile-{i}".encode())
                    sock.connect(address)
                    random_messages(rng, sock, [])
                    time.sleep(rng.random() * 0.02)  # some of it is on the wire, some not
                    sock.close(linger=0)
            finally:
                ctx.term()
            assert r._transport._thread is not None and r._transport._thread.is_alive()
            # the real node was never taken for gone, and still answers
            wait_until(lambda: r.ping().replies().get(node.node_id) is not None, 30, "the real node to answer")
            frame = r.nodes().set_index("node_id")
            assert frame.loc[node.node_id, "status"] in ("online", "busy")
        assert node.proc.poll() is None
    finally:
        node.stop()
