"""The researcher's bulk port: sessions offered over CURVE, and the connections that claim them.

The port is plain TCP and anyone who can reach it can connect, so it trusts nothing until a
connection's first record, a hello (16-byte header, 32-byte body), names a session this
researcher offered to an authenticated node over CURVE and carries that session's tag. Until
then a connection costs 48 bytes of buffer and a thread that gives up after ``HELLO_SECONDS``;
at most ``MAX_UNAUTHENTICATED`` such connections exist at once (``MAX_UNAUTHENTICATED_PER_ADDRESS``
from one address), and any further one is closed as it is accepted. A connection whose hello
is junk, names an unknown or already-claimed session (a replay), or fails its tag is closed at
once and logged (once a minute per reason and address).

One session per node: a node asks for one on each CURVE connection, and a new one replaces the
old. A session ends with its link, with the CURVE connection that asked for it (the monitor's
``disconnected``), when it is replaced, or when it was never claimed within ``OFFER_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedlab.errors import FedlabTransportError
from fedlab.transport.bulk_link import BulkLink, PeerClosed, read_exact, split_tcp, tune
from fedlab.transport.bulk_messages import BulkOffer
from fedlab.transport.bulk_order import BulkInbox, Ready
from fedlab.transport.bulk_seal import (
    CHUNK_BYTES,
    HEADER_BYTES,
    HELLO_BODY_BYTES,
    TO_NODE,
    TO_RESEARCHER,
    Opener,
    Sealer,
    SealError,
    SessionKeys,
    check_hello,
    hello_session,
)
from fedlab.transport.curve import Throttle

__all__ = ["BULK_ENV", "DEFAULT_THRESHOLD", "HELLO_SECONDS", "MAX_UNAUTHENTICATED", "MAX_UNAUTHENTICATED_PER_ADDRESS",
           "ResearcherBulk", "call_once", "make_researcher_bulk"]

log = logging.getLogger("fedlab.transport")
DEFAULT_THRESHOLD = 1 << 20  # messages of at least this many bytes go sealed on the bulk connection
HELLO_SECONDS = 5.0
MAX_UNAUTHENTICATED = 32
MAX_UNAUTHENTICATED_PER_ADDRESS = 4  # one host cannot take every slot from the nodes
OFFER_SECONDS = 30.0
_ACCEPT_POLL_S = 0.25  # how soon the accepting thread notices close()


@dataclass
class _Session:
    keys: SessionKeys
    connection: int | None  # the CURVE connection (fd) that asked for it
    offered_at: float
    link: BulkLink | None = None
    claimed: bool = False


class ResearcherBulk:
    def __init__(self, host: str, port: int, *, advertised_port: int | None = None,
                 threshold: int = DEFAULT_THRESHOLD, chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int) -> None:
        self.host, self.port = host, port
        self.advertised_port = advertised_port
        self.threshold, self.chunk_bytes, self.max_message_bytes = threshold, chunk_bytes, max_message_bytes
        self.inbox = BulkInbox()
        self._lock = threading.Lock()
        self._by_id: dict[bytes, _Session] = {}
        self._by_node: dict[str, _Session] = {}
        self.unauthenticated = 0  # connections waiting for their hello now
        self._waiting_from: dict[str, int] = {}  # ... per address
        self._throttle = Throttle()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sealed_out = 0  # messages handed to a link, and received whole from one (for tests, benchmarks)
        self.sealed_in = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Listen; False (with a warning) when the port cannot be had: the researcher then uses CURVE alone."""
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(info[0], socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(info[4])
            listener.listen(64)
        except OSError as exc:
            log.warning("bulk path off: cannot listen on %s:%d for the bulk connections (%s); large messages go "
                        "over CURVE, about 3x slower. Free that port or pick another with bulk='tcp://HOST:PORT'",
                        self.host, self.port, exc.strerror or exc)
            return False
        listener.settimeout(_ACCEPT_POLL_S)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="fedlab-bulk-accept", daemon=True)
        self._thread.start()
        log.info("bulk path: listening on %s:%d for sealed (AES-256-GCM) transfers of messages >= %d bytes",
                 self.host, self.port, self.threshold)
        return True

    def closing(self) -> None:
        """The researcher is saying goodbye: links that close from now on are expected to."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * _ACCEPT_POLL_S + 1)
        with self._lock:
            links = [s.link for s in self._by_id.values() if s.link is not None]
            self._by_id.clear()
            self._by_node.clear()
        for link in links:
            link.close("the researcher closed")
        for link in links:
            link.join(2.0)
        self.inbox.close()

    # -- loop thread -----------------------------------------------------------------------------
    def offer(self, node_id: str, connection: int | None) -> tuple[BulkOffer, list[Ready]]:
        """A fresh session for ``node_id`` (replacing its last), and what the old one's end released."""
        keys, secret = SessionKeys.new(node_id)
        now = time.monotonic()
        with self._lock:
            old = self._by_node.get(node_id)
            for sid in [sid for sid, s in self._by_id.items() if not s.claimed and now - s.offered_at > OFFER_SECONDS]:
                del self._by_id[sid]  # offered, never dialled
            session = _Session(keys, connection, now)
            self._by_id[keys.session_id] = session
            self._by_node[node_id] = session
        ready = self._end(node_id, old, "a new session replaced it") if old is not None else []
        offer = BulkOffer(session_id=keys.session_id, secret=secret, port=self.advertised_port or self.port,
                          threshold=self.threshold, chunk_bytes=self.chunk_bytes)
        return offer, ready

    def connection_closed(self, connection: int) -> list[Ready]:
        """The CURVE connection ``connection`` ended: so do the sessions it asked for."""
        with self._lock:
            gone = [(n, s) for n, s in self._by_node.items() if s.connection == connection]
        ready: list[Ready] = []
        for node_id, session in gone:
            ready += self._end(node_id, session, "the node's encrypted control connection closed")
        return ready

    def node_left(self, node_id: str) -> list[Ready]:
        """The node said goodbye: its session ends here, quietly, before its link closes from there."""
        with self._lock:
            session = self._by_node.get(node_id)
        return self._end(node_id, session, "the node said goodbye") if session is not None else []

    def linked(self, node_id: str) -> bool:
        """Whether ``node_id`` has a live bulk link now."""
        with self._lock:
            session = self._by_node.get(node_id)
            return session is not None and session.link is not None and not session.link.closed

    def current(self, node_id: str, session_id: bytes) -> bool:
        with self._lock:
            session = self._by_node.get(node_id)
            return session is not None and session.keys.session_id == session_id and session.link is not None \
                and not session.link.closed

    def _end(self, node_id: str, session: _Session, reason: str) -> list[Ready]:
        with self._lock:
            self._by_id.pop(session.keys.session_id, None)
            if self._by_node.get(node_id) is session:
                del self._by_node[node_id]
        if session.link is not None:
            session.link.close(reason)
        return self.inbox.session_ended(node_id, session.keys.session_id, reason)

    # -- any thread ------------------------------------------------------------------------------
    def route(self, node_id: str, msg_id: str, frames: Sequence[Any],
              on_failure: Callable[[str], None] | None) -> bytes | None:
        """Queue a message on ``node_id``'s link: its session id, or None when it has no live link."""
        with self._lock:
            session = self._by_node.get(node_id)
            link = session.link if session is not None else None
        if link is None or not link.send(msg_id, frames, on_failure):
            return None
        with self._lock:
            self.sealed_out += 1
        return link.session_id

    # -- the port ----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        try:
            while not self._stop.is_set():
                try:
                    conn, address = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:  # pragma: no cover - out of descriptors, say
                    self._refused("accept", str(exc.strerror or exc), "")
                    self._stop.wait(_ACCEPT_POLL_S)
                    continue
                host = address[0]
                with self._lock:
                    full = self.unauthenticated >= MAX_UNAUTHENTICATED
                    crowded = self._waiting_from.get(host, 0) >= MAX_UNAUTHENTICATED_PER_ADDRESS
                    if not (full or crowded):
                        self.unauthenticated += 1
                        self._waiting_from[host] = self._waiting_from.get(host, 0) + 1
                if full or crowded:
                    conn.close()
                    self._refused("full", f"{MAX_UNAUTHENTICATED} connections are already waiting to say hello"
                                  if full else f"{MAX_UNAUTHENTICATED_PER_ADDRESS} connections from this address are "
                                  "already waiting to say hello", host)
                    continue
                threading.Thread(target=self._admit, args=(conn, address[0]), name="fedlab-bulk-hello",
                                 daemon=True).start()
        finally:
            listener.close()

    def _admit(self, conn: socket.socket, address: str) -> None:
        """Read and check the hello within HELLO_SECONDS; make the link, or close and log."""
        admitted = False
        try:
            conn.settimeout(HELLO_SECONDS)
            header, body = memoryview(bytearray(HEADER_BYTES)), memoryview(bytearray(HELLO_BODY_BYTES))
            read_exact(conn, header)
            check_hello(header)  # the shape first: junk reads no further
            read_exact(conn, body)
            session_id = hello_session(header, body)
            with self._lock:
                session = self._by_id.get(session_id)
            if session is None:
                raise SealError("unknown_session", "a hello for a session this researcher did not offer (or that "
                                "has ended)")
            opener = Opener(session.keys, TO_RESEARCHER, self.max_message_bytes)
            opener.check_header(header, greeting=True)
            opener.open_greeting(body)
            admitted = self._claim(conn, session, opener)
        except SealError as exc:
            self._refused(exc.reason, str(exc), address)
        except (OSError, PeerClosed) as exc:  # the 48 bytes did not come in time, or the peer went away
            self._refused("no_hello", f"no complete hello within {HELLO_SECONDS:g} s ({exc})", address)
        finally:
            with self._lock:
                self.unauthenticated -= 1
                left = self._waiting_from.pop(address, 1) - 1
                if left:
                    self._waiting_from[address] = left
            if not admitted:
                conn.close()

    def _claim(self, conn: socket.socket, session: _Session, opener: Opener) -> bool:
        """Bind ``conn`` to ``session`` (once: a second hello is a replay), welcome, start the link."""
        node_id, sid = session.keys.node_id, session.keys.session_id
        with self._lock:
            if session.claimed or self._by_id.get(sid) is not session:
                raise SealError("replay", "a hello for a session that a connection has claimed already (a "
                                "replayed hello)")
            session.claimed = True
        sealer = Sealer(session.keys, TO_NODE, self.chunk_bytes)
        def arrived(_link: BulkLink, msg_id: str, frames: list[memoryview]) -> None:
            with self._lock:
                self.sealed_in += 1
            self.inbox.link_message(node_id, sid, msg_id, frames)
        link = BulkLink(conn, sealer, opener, peer=f"node {node_id}", on_message=arrived, on_closed=self._link_closed)
        try:
            conn.sendall(sealer.greeting())  # before the link is visible: the welcome is the first record
        except OSError:
            with self._lock:
                self._by_id.pop(sid, None)
                if self._by_node.get(node_id) is session:
                    del self._by_node[node_id]
            raise
        conn.settimeout(None)
        tune(conn)
        with self._lock:
            if self._by_id.get(sid) is not session:  # ended while we said welcome
                return False
            session.link = link
        link.start()
        log.info("node %s: bulk connection up (sealed with AES-256-GCM)", node_id)
        return True

    def _link_closed(self, link: BulkLink, reason: str, receiving: str | None) -> None:
        node_id = link.sealer.keys.node_id
        with self._lock:
            session = self._by_id.pop(link.session_id, None)
            if session is not None and self._by_node.get(node_id) is session:
                del self._by_node[node_id]
        if session is not None and not self._stop.is_set():  # not ended by this side: say why
            log.warning("node %s: bulk connection closed: %s; large messages go over CURVE until the node opens "
                        "a new one", node_id, reason)
        self.inbox.link_closed(node_id, link.session_id, reason, receiving)

    def _refused(self, reason: str, detail: str, address: str) -> None:
        if self._throttle.ready(f"{reason} {address}"):
            log.warning("refused a connection to the bulk port from %s: %s; nothing it sent was used",
                        address or "an unknown address", detail)


BULK_ENV = "FEDLAB_BULK"
_OFF, _ON = {"off", "false", "no", "0"}, {"on", "true", "yes", "1", ""}


def make_researcher_bulk(address: str, bulk: bool | str | None, *, advertised_port: int | None, threshold: int,
                         chunk_bytes: int, max_message_bytes: int) -> ResearcherBulk | None:
    """The bulk path an encrypted researcher at ``address`` asked for (see ZmqResearcherTransport), or None."""
    setting = bulk if bulk is not None else os.environ.get(BULK_ENV, "on")
    text = str(setting).strip().lower()
    if setting is False or text in _OFF:
        return None
    if setting is True or text in _ON:
        control = split_tcp(address)
        if control is None or control[1] >= 65535:
            log.warning("bulk path off: it listens on the control port + 1 of a tcp://HOST:PORT address, and %s is "
                        "not one; give it its own with bulk='tcp://HOST:PORT'", address)
            return None
        host, port = control[0], control[1] + 1
    else:
        endpoint = split_tcp(str(setting)) if isinstance(setting, str) else None
        if endpoint is None:
            raise FedlabTransportError(f"bulk={setting!r} is not a bulk setting: give True, False or "
                                       "'tcp://HOST:PORT' (the address its port listens on)")
        host, port = endpoint
    return ResearcherBulk(host, port, advertised_port=advertised_port, threshold=threshold, chunk_bytes=chunk_bytes,
                          max_message_bytes=max_message_bytes)


def call_once(callback: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``callback`` that runs at most once (a message on two paths may fail on both)."""
    if callback is None:
        return None
    fired = threading.Event()
    lock = threading.Lock()

    def run(reason: str) -> None:
        with lock:
            if fired.is_set():
                return
            fired.set()
        callback(reason)
    return run
