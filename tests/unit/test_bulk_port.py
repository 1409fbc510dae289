"""The researcher's bulk port (fedlab.transport.bulk_researcher) against real TCP clients on loopback.

Nothing reaches a session before a valid hello: junk, a hello for a session that was never
offered, a tampered hello, a replayed one (the session is claimed already), data records
without a hello, or silence are each refused by closing the connection, with one log line;
at most MAX_UNAUTHENTICATED connections (a few per address) wait for their hello at once. A valid hello is
welcomed and its link carries sealed messages both ways; the session ends with its CURVE
connection. (tests/integration/test_bulk_hostile.py does this against real node processes.)
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import time

import pytest

from fedlab.transport import bulk_researcher
from fedlab.transport.bulk_link import BulkLink, read_exact
from fedlab.transport.bulk_order import Sealed
from fedlab.transport.bulk_researcher import MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS, ResearcherBulk
from fedlab.transport.bulk_seal import HEADER_BYTES, TAG_BYTES, TO_NODE, TO_RESEARCHER, Opener, Sealer, SessionKeys

WAIT = 10.0  # a hang guard, not a speed requirement


@pytest.fixture
def port(caplog):
    caplog.set_level(logging.INFO, logger="fedlab.transport")
    bulk = ResearcherBulk("127.0.0.1", 0, max_message_bytes=1 << 20, chunk_bytes=4096)
    assert bulk.start()
    yield bulk
    bulk.close()


def dial(bulk: ResearcherBulk) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bulk.port), timeout=WAIT)
    return sock


def refused(sock: socket.socket) -> bool:
    """True once the researcher has closed ``sock`` (it reads the end of the stream)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def node_keys(bulk: ResearcherBulk, node_id: str = "node-a", connection: int = 7) -> SessionKeys:
    offer, _ = bulk.offer(node_id, connection)
    return SessionKeys.derive(offer.secret, offer.session_id, node_id)


def hello_and_welcome(bulk: ResearcherBulk, keys: SessionKeys) -> socket.socket:
    sock = dial(bulk)
    sock.sendall(Sealer(keys, TO_RESEARCHER).greeting())
    header, body = memoryview(bytearray(HEADER_BYTES)), memoryview(bytearray(TAG_BYTES))
    read_exact(sock, header)
    opener = Opener(keys, TO_NODE, 1 << 20)
    opener.check_header(header, greeting=True)
    read_exact(sock, body)
    opener.open_greeting(body)  # the welcome proves the researcher holds the session key
    return sock


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_valid_hello_is_welcomed_and_its_link_carries_messages_both_ways(port):
    keys = node_keys(port)
    sock = hello_and_welcome(port, keys)
    got: queue.Queue = queue.Queue()
    link = BulkLink(sock, Sealer(keys, TO_RESEARCHER, 4096), Opener(keys, TO_NODE, 1 << 20), peer="the researcher",
                    on_message=lambda _l, msg_id, frames: got.put((msg_id, [bytes(f) for f in frames])),
                    on_closed=lambda *_: None)
    link.start()
    try:
        wait_for(lambda: port.current("node-a", keys.session_id), "the session's link")
        payload = os.urandom(50_000)
        assert port.route("node-a", "to-node", [b"h", b"c", payload], None) == keys.session_id
        assert got.get(timeout=WAIT) == ("to-node", [b"h", b"c", payload])
        link.send("to-researcher", [b"h", b"c", payload])
        port.inbox.notice("node-a", keys.session_id, "to-researcher", None, current=True)
        ready: list = []
        wait_for(lambda: ready.extend(port.inbox.drain()) or ready, "the node's message")
        assert isinstance(ready[0], Sealed) and [bytes(f) for f in ready[0].frames] == [b"h", b"c", payload]
        assert port.sealed_out == 1 and port.sealed_in == 1
        # its CURVE connection (fd 7) ends: so does the session, from this side
        port.connection_closed(7)
        wait_for(lambda: link.closed, "the link to close")
        assert port.route("node-a", "later", [b"h", b"c"], None) is None
    finally:
        link.close("test over")
        link.join(WAIT)


@pytest.mark.parametrize("first, logged", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a fedlab bulk record"),
    (os.urandom(200), "not a fedlab bulk record"),
    (b"FB\x01\x03" + (100).to_bytes(4, "big") + (1).to_bytes(8, "big"), "expected a hello first, got a start"),
    (b"FB\x01\x01" + (1 << 30).to_bytes(4, "big") + bytes(8), "expected a hello first, got a hello record of "
                                                                "1073741824 bytes"),
])
def test_junk_and_records_before_a_hello_are_refused(port, caplog, first, logged):
    sock = dial(port)
    sock.sendall(first)
    wait_for(lambda: refused(sock), "the connection to be closed")
    sock.close()
    wait_for(lambda: f"refused a connection to the bulk port from 127.0.0.1: {logged}" in caplog.text, "the log line")


def test_a_hello_for_a_session_never_offered_is_refused(port, caplog):
    stranger, _ = SessionKeys.new("node-a")
    sock = dial(port)
    sock.sendall(Sealer(stranger, TO_RESEARCHER).greeting())
    wait_for(lambda: refused(sock), "the connection to be closed")
    sock.close()
    wait_for(lambda: "a hello for a session this researcher did not offer" in caplog.text, "the log line")


def test_a_tampered_hello_is_refused_and_the_session_stays_open_for_the_real_node(port, caplog):
    keys = node_keys(port)
    hello = bytearray(Sealer(keys, TO_RESEARCHER).greeting())
    hello[-3] ^= 0x40
    sock = dial(port)
    sock.sendall(bytes(hello))
    wait_for(lambda: refused(sock), "the connection to be closed")
    sock.close()
    wait_for(lambda: "a bulk record failed authentication" in caplog.text, "the log line")
    hello_and_welcome(port, keys).close()  # the real node still gets in


def test_a_replayed_hello_is_refused_while_the_first_connection_keeps_its_session(port, caplog):
    keys = node_keys(port)
    first = hello_and_welcome(port, keys)
    wait_for(lambda: port.current("node-a", keys.session_id), "the session's link")
    replay = dial(port)
    replay.sendall(Sealer(keys, TO_RESEARCHER).greeting())  # the same 48 bytes a wiretap saw
    wait_for(lambda: refused(replay), "the replay to be closed")
    replay.close()
    wait_for(lambda: "a replayed hello" in caplog.text, "the log line")
    assert port.current("node-a", keys.session_id)
    first.close()


def test_silence_is_refused_after_the_hello_deadline(port, caplog, monkeypatch):
    monkeypatch.setattr(bulk_researcher, "HELLO_SECONDS", 0.3)
    sock = dial(port)
    sock.sendall(b"FB")  # two bytes, then nothing
    wait_for(lambda: refused(sock), "the silent connection to be closed")
    sock.close()
    wait_for(lambda: "no complete hello within 0.3 s" in caplog.text, "the log line")


def dial_from(bulk: ResearcherBulk, host: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", bulk.port), timeout=WAIT, source_address=(host, 0))


def test_one_address_may_keep_only_a_few_connections_waiting_for_their_hello(port, caplog):
    waiting = [dial_from(port, "127.0.0.2") for _ in range(MAX_UNAUTHENTICATED_PER_ADDRESS)]
    try:
        wait_for(lambda: port.unauthenticated == MAX_UNAUTHENTICATED_PER_ADDRESS, "the hello threads to be busy")
        extra = dial_from(port, "127.0.0.2")
        wait_for(lambda: refused(extra), "the extra connection to be closed")
        extra.close()
        wait_for(lambda: f"{MAX_UNAUTHENTICATED_PER_ADDRESS} connections from this address are already waiting"
                 in caplog.text, "the log line")
        hello_and_welcome(port, node_keys(port)).close()  # a node elsewhere still gets in
    finally:
        for sock in waiting:
            sock.close()


def test_at_most_max_unauthenticated_connections_wait_for_their_hello(port, caplog):
    hosts = [f"127.0.0.{10 + i // MAX_UNAUTHENTICATED_PER_ADDRESS}" for i in range(MAX_UNAUTHENTICATED)]
    waiting = [dial_from(port, host) for host in hosts]
    try:
        wait_for(lambda: port.unauthenticated == MAX_UNAUTHENTICATED, "every hello thread to be busy")
        extra = dial_from(port, "127.0.0.99")
        wait_for(lambda: refused(extra), "the extra connection to be closed")
        extra.close()
        wait_for(lambda: f"{MAX_UNAUTHENTICATED} connections are already waiting to say hello" in caplog.text,
                 "the log line")
    finally:
        for sock in waiting:
            sock.close()
    keys = node_keys(port)  # once they are gone, a node gets in again
    wait_for(lambda: port.unauthenticated == 0, "the hello threads to finish")
    hello_and_welcome(port, keys).close()


def test_an_oversized_message_after_the_hello_closes_the_link(port, caplog):
    keys = node_keys(port)
    sock = hello_and_welcome(port, keys)
    wait_for(lambda: port.current("node-a", keys.session_id), "the session's link")
    sock.sendall(Sealer(keys, TO_RESEARCHER).start("huge", [10, 10, 1 << 40]))
    wait_for(lambda: refused(sock), "the link to be closed")
    sock.close()
    wait_for(lambda: "exceeds the limit of 1048576 bytes" in caplog.text, "the log line")
    assert not port.current("node-a", keys.session_id)


def test_a_new_offer_replaces_the_nodes_last_session(port):
    old = node_keys(port)
    sock = hello_and_welcome(port, old)
    wait_for(lambda: port.current("node-a", old.session_id), "the first session's link")
    new = node_keys(port, connection=8)
    wait_for(lambda: refused(sock), "the old link to be closed")
    sock.close()
    assert not port.current("node-a", old.session_id)
    hello_and_welcome(port, new).close()
