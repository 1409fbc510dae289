"""Hostile traffic against the researcher's bulk port, with real encrypted `fedlab node` processes.

The bulk port is plain TCP: anyone who reaches it can connect. A hostile process that sends
junk, records that do not start with a hello, or a replay of a sealed stream it captured is
refused and logged, and nothing it sent reaches a session. A byte changed in flight (by a
relay between the node and the researcher, in either direction) is detected: the link closes,
the message it belonged to fails its request with a clear error (not a hang), and the node
opens a new session by itself. Throughout, the node and the researcher keep answering.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from federation import wait_until
from test_bulk_path import keyed_researcher, make_federation

from fedlab import DiscardOnTimeout, Researcher
from fedlab.protocol import PingRequest

pytestmark = pytest.mark.integration
DEADLINE = 60.0  # a hang guard, not a speed requirement
PAYLOAD = 4 << 20

# A hostile process: connects to the port, writes the bytes of a file, and says whether the
# researcher closed the connection on it (it waits a few seconds for that).
HOSTILE = r'''
import socket, sys
data = open(sys.argv[2], "rb").read()
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=15)
try:
    sock.sendall(data)
except OSError:
    pass
try:
    while sock.recv(65536):
        pass
    print("closed")
except TimeoutError:
    print("still open")
except OSError:
    print("closed")
'''


def hostile(port: int, data: bytes, tmp_path: Path) -> str:
    path = tmp_path / f"hostile-{hashlib.sha256(data).hexdigest()[:8]}.bin"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", HOSTILE, str(port), str(path)], capture_output=True, text=True,
                         timeout=DEADLINE, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class Relay:
    """Sits between the node and the researcher's bulk port: forwards both ways, keeps a copy of
    each connection's node-to-researcher bytes, and corrupts one byte on request."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.captured: list[bytearray] = []  # per connection, what the node sent
        self.sent = [0, 0]  # bytes forwarded on the current connection: to the researcher, to the node
        self.flip: list[int | None] = [None, None]  # offset on the current connection to corrupt, per direction
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def corrupt_next(self, direction: int, ahead: int) -> None:
        """Flip a byte ``ahead`` bytes further in ``direction`` (0: to the researcher, 1: to the node)."""
        with self.lock:
            self.flip[direction] = self.sent[direction] + ahead

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                node, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            researcher = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.captured.append(bytearray())
                self.sent = [0, 0]
                self._socks += [node, researcher]
            record = self.captured[-1]
            threading.Thread(target=self._pump, args=(node, researcher, 0, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(researcher, node, 1, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: int, record: bytearray | None) -> None:
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                with self.lock:
                    at = self.flip[direction]
                    start = self.sent[direction]
                    if at is not None and start <= at < start + len(data):
                        data[at - start] ^= 0x20
                        self.flip[direction] = None
                    self.sent[direction] += len(data)
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()  # the accepting thread wakes within 0.2 s and ends
        with self.lock:
            for sock in self._socks:
                sock.close()


def echo(r: Researcher, node_id: str, size: int = PAYLOAD, seed: int = 0):
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    req = r.requests.send(PingRequest(echo_buffers=True), [node_id], [DiscardOnTimeout(DEADLINE)],
                          buffers=[payload]).wait()
    if req.replies():
        (back,) = req.replies()[node_id].buffers
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    return req


def still_answering(r: Researcher, node_id: str, bulk, sealed_in: int) -> None:
    """A large echo comes back sealed, and a plain ping and statistics still work."""
    req = echo(r, node_id, seed=7)
    assert not req.missing() and not req.errors(), (req.missing(), req.errors())
    assert bulk.sealed_in > sealed_in
    assert list(r.ping().replies()) == [node_id]
    fds = r.search(["breast-cancer"])
    assert r.stats(fds, ["count"], columns=["mean radius"]).global_stats().loc["mean radius", "count"] > 0


@pytest.fixture
def federation(tmp_path, address, caplog):
    """One encrypted node whose bulk connection runs through a Relay; yields (researcher, node, relay)."""
    caplog.set_level(logging.INFO, logger="fedlab")
    nodes, secret, allowlist = make_federation(tmp_path / "fed", address, keyed=True, n=1)
    bulk_port = socket.create_server(("127.0.0.1", 0))
    port = bulk_port.getsockname()[1]
    bulk_port.close()
    relay = Relay(port)
    r = keyed_researcher(address, secret, allowlist, bulk=f"tcp://127.0.0.1:{port}", bulk_advertised_port=relay.port)
    try:
        r.wait_for_nodes(1, timeout=DEADLINE)
        wait_until(lambda: r._transport.bulk.linked(nodes[0].node_id), DEADLINE, "the node's bulk link")
        yield r, nodes[0], relay
    finally:
        r.close()
        relay.close()
        nodes[0].stop()


def test_junk_and_records_before_a_hello_are_refused_and_everyone_keeps_answering(federation, tmp_path, caplog):
    r, node, _ = federation
    bulk = r._transport.bulk
    echo(r, node.node_id)  # a sealed exchange first: what follows must not disturb the session
    sealed_in = bulk.sealed_in
    attempts = [  # each is closed; the log says why, once a minute per reason and address
        b"GET / HTTP/1.1\r\nHost: researcher\r\n\r\n",
        np.random.default_rng(1).bytes(100_000),
        b"FB\x01\x03" + (64).to_bytes(4, "big") + (1).to_bytes(8, "big") + bytes(64),  # a start, no hello
        b"FB\x01\x01" + (1 << 31).to_bytes(4, "big") + bytes(8),  # a "hello" declaring 2 GiB
    ]
    for data in attempts:
        assert hostile(bulk.port, data, tmp_path) == "closed"
    for logged in ("not a fedlab bulk record", "expected a hello first, got a start record of 64 bytes"):
        wait_until(lambda logged=logged: f"refused a connection to the bulk port from 127.0.0.1: {logged}"
                   in caplog.text, DEADLINE, f"the refusal: {logged}")
    assert bulk.linked(node.node_id)
    still_answering(r, node.node_id, bulk, sealed_in)


def test_a_replayed_capture_is_refused_while_the_session_lives_and_after_it_ended(federation, tmp_path, caplog):
    r, node, relay = federation
    bulk = r._transport.bulk
    echo(r, node.node_id)
    captured = bytes(relay.captured[-1])  # the node's hello, then its sealed reply
    assert len(captured) > PAYLOAD
    assert hostile(bulk.port, captured, tmp_path) == "closed"
    wait_until(lambda: "a replayed hello" in caplog.text, DEADLINE, "the replay's refusal")
    assert hostile(bulk.port, captured[48:], tmp_path) == "closed"  # the sealed records without their hello
    wait_until(lambda: "expected a hello first, got a start record" in caplog.text, DEADLINE, "the refusal")
    assert bulk.linked(node.node_id)
    still_answering(r, node.node_id, bulk, bulk.sealed_in)

    # the session ends (here: the relay cuts it mid-transfer); the node opens a new one by itself
    sessions = len(relay.captured)
    relay.corrupt_next(0, 10_000)
    echo(r, node.node_id, seed=3)
    wait_until(lambda: len(relay.captured) > sessions and bulk.linked(node.node_id), DEADLINE, "a new session")
    assert hostile(bulk.port, captured, tmp_path) == "closed"
    wait_until(lambda: "a hello for a session this researcher did not offer (or that has ended)" in caplog.text,
               DEADLINE, "the stale replay's refusal")
    still_answering(r, node.node_id, bulk, bulk.sealed_in)


@pytest.mark.parametrize("direction", ["to the researcher", "to the node"])
def test_a_byte_changed_in_flight_fails_that_message_and_the_path_recovers(federation, caplog, direction):
    r, node, relay = federation
    bulk = r._transport.bulk
    echo(r, node.node_id)
    sessions = len(relay.captured)
    # well inside the next message's 4 MiB buffer: past its start, header and content records
    relay.corrupt_next(0 if direction == "to the researcher" else 1, 100_000)
    req = echo(r, node.node_id, seed=5)
    assert not req.replies(), "a corrupted message was delivered"
    # the request ends at once, not at its timeout: the receiver's error reply, or the sender's failed send
    ended = {**{n: e.code for n, e in req.errors().items()}, **{n: m.reason for n, m in req.missing().items()}}
    assert ended and set(ended.values()) <= {"transfer_lost", "disconnected"}, ended
    if direction == "to the researcher":
        refusal, log = f"refused a record from node {node.node_id} (bad_tag): a bulk record failed authentication", \
            lambda: caplog.text
    else:
        refusal, log = "refused a record from the researcher (bad_tag): a bulk record failed authentication", node.log
    wait_until(lambda: refusal in log(), DEADLINE, "the refusal in the log")
    wait_until(lambda: "lost message" in log() or "cut off mid-transfer" in log(), DEADLINE,
               "the lost message's msg_id in the log")
    wait_until(lambda: len(relay.captured) > sessions and bulk.linked(node.node_id), DEADLINE,
               "the node's new bulk session")
    still_answering(r, node.node_id, bulk, bulk.sealed_in)
    assert node.proc.poll() is None
