"""BulkLink (fedlab.transport.bulk_link) over a real socket pair: messages both ways, and its failures.

A link carries messages in both directions at once; a peer that goes away mid-message ends the
link with the msg_id that was cut off; a record that fails its check closes it; messages still
queued when a link closes fail with a log line naming their msg_id, and their on_failure hears
why. Nothing here is a silent drop.
"""

from __future__ import annotations

import logging
import os
import queue
import socket

import pytest

from fedlab.transport.bulk_link import BulkLink, split_tcp
from fedlab.transport.bulk_seal import (
    HEADER_BYTES,
    MIN_CHUNK_BYTES,
    TO_NODE,
    TO_RESEARCHER,
    Opener,
    Sealer,
    SessionKeys,
)

WAIT = 10.0  # a hang guard, not a speed requirement


class Ends:
    """Two links over a socket pair: ``researcher`` and ``node``, with what each received and how it ended."""

    def __init__(self) -> None:
        mine, secret = SessionKeys.new("node-a")
        theirs = SessionKeys.derive(secret, mine.session_id, "node-a")
        a, b = socket.socketpair()
        self.keys = mine
        self.got: dict[str, queue.Queue] = {"researcher": queue.Queue(), "node": queue.Queue()}
        self.ended: dict[str, queue.Queue] = {"researcher": queue.Queue(), "node": queue.Queue()}
        self.researcher = BulkLink(a, Sealer(mine, TO_NODE, MIN_CHUNK_BYTES), Opener(mine, TO_RESEARCHER, 1 << 24),
                                   peer="node node-a", on_message=self._on("researcher"),
                                   on_closed=self._closed("researcher"))
        self.node = BulkLink(b, Sealer(theirs, TO_RESEARCHER, MIN_CHUNK_BYTES), Opener(theirs, TO_NODE, 1 << 24),
                             peer="the researcher", on_message=self._on("node"), on_closed=self._closed("node"))

    def _on(self, side):
        return lambda link, msg_id, frames: self.got[side].put((msg_id, [bytes(f) for f in frames]))

    def _closed(self, side):
        return lambda link, reason, receiving: self.ended[side].put((reason, receiving))

    def start(self) -> Ends:
        self.researcher.start()
        self.node.start()
        return self

    def stop(self) -> None:
        for link in (self.researcher, self.node):
            link.close("test over")
            link.join(WAIT)
            link.sock.close()  # a link whose threads never ran has not closed it


@pytest.fixture
def ends():
    pair = Ends()
    yield pair
    pair.stop()


def test_messages_cross_both_ways_at_once(ends):
    ends.start()
    big = [b"header", b"content", os.urandom(10 * MIN_CHUNK_BYTES + 7), bytearray(os.urandom(100))]
    reply = [b"h", b"c", memoryview(os.urandom(3 * MIN_CHUNK_BYTES))]
    for i in range(3):
        assert ends.researcher.send(f"request-{i}", big)
        assert ends.node.send(f"reply-{i}", reply)
    for i in range(3):
        assert ends.got["node"].get(timeout=WAIT) == (f"request-{i}", [bytes(f) for f in big])
        assert ends.got["researcher"].get(timeout=WAIT) == (f"reply-{i}", [bytes(f) for f in reply])


def test_a_peer_that_goes_away_mid_message_ends_the_link_naming_it(ends):
    ends.node.start()  # only the node reads; the "researcher" writes by hand, then vanishes
    sealer = ends.researcher.sealer
    out = memoryview(bytearray(HEADER_BYTES + sealer.chunk_bytes + 16))
    payload = os.urandom(2 * MIN_CHUNK_BYTES)
    sock = ends.researcher.sock
    sock.sendall(sealer.start("cut-off", [1, 1, len(payload)]))
    sock.sendall(sealer.data_into(out, b"h", "cut-off", 0, 0))
    sock.sendall(sealer.data_into(out, b"c", "cut-off", 1, 0))
    record = bytes(sealer.data_into(out, memoryview(payload)[:MIN_CHUNK_BYTES], "cut-off", 2, 0))
    sock.sendall(record[:100])
    sock.close()
    reason, receiving = ends.ended["node"].get(timeout=WAIT)
    assert receiving == "cut-off"
    assert "the connection closed after 84 of" in reason
    assert ends.got["node"].empty()


def test_a_record_that_fails_its_check_closes_the_link(ends, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab.transport")
    ends.node.start()
    sealer = ends.researcher.sealer
    start = bytearray(sealer.start("tampered", [1, 1]))
    start[-1] ^= 1
    ends.researcher.sock.sendall(bytes(start))
    reason, receiving = ends.ended["node"].get(timeout=WAIT)
    assert reason.startswith("refused a record from the researcher (bad_tag): a bulk record failed authentication")
    assert receiving is None and ends.node.closed


def test_messages_queued_on_a_closed_link_fail_with_their_msg_id(ends, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab.transport")
    failures: queue.Queue = queue.Queue()
    ends.researcher.close("the node's control connection closed")
    assert not ends.researcher.send("late", [b"h", b"c"], failures.put)  # refused at once: nothing queued
    assert failures.empty()
    ends.start()
    reason, _ = ends.ended["researcher"].get(timeout=WAIT)
    assert reason == "the node's control connection closed"


def test_a_send_that_fails_tells_on_failure_and_logs(ends, caplog):
    caplog.set_level(logging.WARNING, logger="fedlab.transport")
    failures: queue.Queue = queue.Queue()
    ends.node.sock.close()  # the peer is gone before anything is sent
    assert ends.researcher.send("doomed", [b"h", b"c", os.urandom(50 * MIN_CHUNK_BYTES)], failures.put)
    ends.researcher.start()
    # the sending thread meets the broken pipe, or the receiving one the end of the stream first
    reason = failures.get(timeout=WAIT)
    assert reason.startswith(("the bulk connection failed while sending", "the connection closed")), reason
    ends.ended["researcher"].get(timeout=WAIT)
    assert f"dropped message doomed to node node-a: {reason}" in caplog.text
    assert failures.empty()  # told once


@pytest.mark.parametrize("address, expected", [
    ("tcp://127.0.0.1:5555", ("127.0.0.1", 5555)), ("tcp://*:6000", ("0.0.0.0", 6000)),
    ("tcp://[::1]:7000", ("::1", 7000)), ("tcp://host.example:1", ("host.example", 1)),
    ("ipc:///tmp/x", None), ("tcp://127.0.0.1:*", None), ("tcp://127.0.0.1:0", None), ("tcp://:5555", None),
])
def test_split_tcp(address, expected):
    assert split_tcp(address) == expected
