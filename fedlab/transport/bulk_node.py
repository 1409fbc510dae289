"""The node's bulk path: it asks for a session on each CURVE connection and dials the bulk port.

Only an encrypted node asks, and only the researcher its CURVE connection authenticated can
answer: the offer (the session secret, the port) comes over that connection. The node dials the
researcher's host as its own config names it, on the offered port, sends the hello and waits for
the welcome (``HANDSHAKE_SECONDS``), so it never sends a sealed message into a connection the
researcher did not accept. Until then, and whenever the link is down, every message goes over
CURVE as before; a researcher without the bulk path (an older one, or one with it off) answers
the request with an error, and the node does not ask again on that connection.

When the link closes while CURVE is up the node asks for a new session, after a pause that
doubles with each failure (``RETRY_FIRST_S`` up to ``RETRY_MAX_S``). When CURVE drops, the
session ends with it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from fedlab.protocol import Envelope, make_envelope
from fedlab.transport.bulk_link import BulkLink, PeerClosed, read_exact, split_tcp, tune
from fedlab.transport.bulk_messages import BulkOffer, BulkRequest
from fedlab.transport.bulk_order import BulkInbox, Ready
from fedlab.transport.bulk_seal import (
    HEADER_BYTES,
    TAG_BYTES,
    TO_NODE,
    TO_RESEARCHER,
    Opener,
    Sealer,
    SealError,
    SessionKeys,
)
from fedlab.transport.curve import Throttle

__all__ = ["HANDSHAKE_SECONDS", "RESEARCHER", "NodeBulk"]

log = logging.getLogger("fedlab.transport")
RESEARCHER = "researcher"  # the one peer, in the inbox
HANDSHAKE_SECONDS = 10.0
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0


class NodeBulk:
    def __init__(self, node_id: str, researcher_address: str, *, max_message_bytes: int) -> None:
        self.node_id = node_id
        endpoint = split_tcp(researcher_address)
        self.host = endpoint[0] if endpoint is not None else None
        self.max_message_bytes = max_message_bytes
        self.inbox = BulkInbox()
        self.threshold = 0
        self._lock = threading.Lock()
        self._link: BulkLink | None = None
        self._keys: SessionKeys | None = None  # the session offered last (dialling or up)
        self._asked: str | None = None  # msg_id of the request waiting for its answer
        self._refused = False  # the researcher said no on this CURVE connection
        self._connected = False  # the CURVE connection is up
        self._retry_at = 0.0
        self._failures = 0
        self._throttle = Throttle()
        self._closed = False
        if self.host is None:
            log.info("bulk path off: %s is not a tcp://HOST:PORT address", researcher_address)

    # -- loop thread ---------------------------------------------------------------------------
    def connected(self) -> None:
        """A CURVE connection is up: a new one may be asked for at once."""
        with self._lock:
            self._connected, self._refused, self._asked, self._retry_at = True, False, None, 0.0

    def disconnected(self) -> list[Ready]:
        """The CURVE connection is gone: so is the session."""
        with self._lock:
            self._connected, self._asked = False, None
            link, keys, self._link, self._keys = self._link, self._keys, None, None
        if link is not None:
            link.close("the encrypted control connection closed")
        return self.inbox.session_ended(RESEARCHER, keys.session_id, "the encrypted control connection closed") \
            if keys is not None else []

    def request(self) -> Envelope | None:
        """The request to send now, if one is due (called each heartbeat)."""
        with self._lock:
            due = (self.host is not None and self._connected and not self._refused and self._asked is None
                   and self._keys is None and not self._closed and time.monotonic() >= self._retry_at)
            if not due:
                return None
            envelope = make_envelope(BulkRequest(), self.node_id)
            self._asked = envelope.msg_id
            return envelope

    def answered(self, envelope: Envelope) -> bool:
        """True when ``envelope`` answers our request (then it is handled here, not dispatched)."""
        with self._lock:
            if self._asked is None or envelope.parent_id != self._asked:
                return False
            self._asked = None
            content = envelope.content
            if not isinstance(content, BulkOffer):
                self._refused = True
                refusal = getattr(content, "message", type(content).__name__)
            else:
                keys = SessionKeys.derive(content.secret, content.session_id, self.node_id)
                self._keys, self.threshold = keys, content.threshold
        if not isinstance(content, BulkOffer):
            log.info("the researcher does not offer the bulk path (%s); every message goes over the encrypted "
                     "control connection", refusal)
            return True
        threading.Thread(target=self._dial, args=(keys, content.port, content.chunk_bytes), name="fedlab-bulk-dial",
                         daemon=True).start()
        return True

    def current(self, session_id: bytes) -> bool:
        link = self._link
        return link is not None and not link.closed and link.session_id == session_id

    def close(self) -> None:
        with self._lock:
            self._closed = True
            link, self._link, self._keys = self._link, None, None
        if link is not None:
            link.close("the node stopped")
            link.join(2.0)
        self.inbox.close()

    # -- any thread ------------------------------------------------------------------------------
    def route(self, msg_id: str, frames: Sequence[Any]) -> bytes | None:
        """Queue a message on the link: its session id, or None when there is no live link."""
        link = self._link
        if link is None or not link.send(msg_id, frames):
            return None
        return link.session_id

    # -- dialling ----------------------------------------------------------------------------------
    def _dial(self, keys: SessionKeys, port: int, chunk_bytes: int) -> None:
        assert self.host is not None
        where = f"{self.host}:{port}"
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.host, port), timeout=HANDSHAKE_SECONDS)
            sealer = Sealer(keys, TO_RESEARCHER, chunk_bytes)
            opener = Opener(keys, TO_NODE, self.max_message_bytes)
            sock.sendall(sealer.greeting())
            header, body = memoryview(bytearray(HEADER_BYTES)), memoryview(bytearray(TAG_BYTES))
            read_exact(sock, header)
            opener.check_header(header, greeting=True)
            read_exact(sock, body)
            opener.open_greeting(body)
            sock.settimeout(None)
            tune(sock)
        except (OSError, PeerClosed, SealError) as exc:
            if sock is not None:
                sock.close()
            self._failed(keys, f"could not open the bulk connection to {where}: {exc}")
            return
        link = BulkLink(sock, sealer, opener, peer="the researcher",
                        on_message=lambda _l, msg_id, frames: self.inbox.link_message(RESEARCHER, keys.session_id,
                                                                                    msg_id, frames),
                        on_closed=self._link_closed)
        with self._lock:
            live = self._keys is keys and not self._closed
            if live:
                self._link, self._failures = link, 0
        if not live:  # the CURVE connection dropped (or the node stopped) while we dialled
            sock.close()
            return
        link.start()
        log.info("bulk connection to the researcher at %s up (AES-256-GCM); messages of %d bytes or more go that way",
                 where, self.threshold)

    def _failed(self, keys: SessionKeys, why: str) -> None:
        with self._lock:
            if self._keys is keys:
                self._keys = None
            self._failures += 1
            pause = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + pause
        if self._throttle.ready("dial"):
            log.warning("%s; large messages go over the encrypted control connection (slower) meanwhile; retrying "
                        "in %.0f s", why, pause)

    def _link_closed(self, link: BulkLink, reason: str, receiving: str | None) -> None:
        with self._lock:
            ours = self._link is link
            if ours:
                self._link, self._keys = None, None
        self.inbox.link_closed(RESEARCHER, link.session_id, reason, receiving)
        if ours:
            self._failed(link.sealer.keys, f"the bulk connection closed ({reason})")
