"""The node's side of the wire: a DEALER socket, identity = node id, that dials out.

Hospital firewalls allow outbound connections only, so the node connects to the researcher,
never the reverse. The loop thread owns the socket: it sends heartbeats (which also
introduce the node to a researcher that just started) and hands every validated message to
``on_message``. Replies come back from worker threads through an outbox.

Whether the researcher is there is libzmq's call, made on its I/O thread without the GIL:
ZMTP heartbeats end a dead connection, the monitor reports it, and libzmq reconnects by
itself. Heartbeats are sent only while connected, so a restarted researcher never receives a
backlog of stale beats. ``IMMEDIATE`` is deliberately *not* set: with it, libzmq tears down
the socket's pipe with each lost connection, which drops every reply queued in it without a
word and can abort the process (``Assertion failed: !_more (src/fq.cpp)``) when a peer
vanishes while a multipart message is being read. Without it the pipe outlives connections:
replies queued during a reconnect leave on the next connection.

With a ``key`` and the researcher's public key (``server_key``) the socket is a CURVE client:
it talks only to that researcher, encrypted. A handshake monitor logs why a researcher
refused this node (or why this node refused it); after a refused handshake, which zmq does
not always retry, the node rebuilds its socket every few seconds, so that it gets in once the
researcher has added it to its allowlist or restarted with the right key.

An encrypted node also asks, on each CURVE connection, for the researcher's sealed bulk path
(``bulk_node``): large replies then go sealed with AES-256-GCM on a second connection, each
with a notice in its place on CURVE, and large requests come in the same way, delivered in
CURVE order (``bulk_order``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from fedlab.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_FRAMES,
    Bye,
    DecodeError,
    Envelope,
    ErrorReply,
    Heartbeat,
    decode,
    encode,
    error_reply_for,
    make_envelope,
)
from fedlab.transport.bulk_messages import BulkNotice, BulkOffer, BulkRequest
from fedlab.transport.bulk_node import RESEARCHER, NodeBulk
from fedlab.transport.bulk_order import Control, Lost, Ready, Sealed
from fedlab.transport.curve import HandshakeMonitor, Throttle, node_refusal
from fedlab.transport.keys import KeyPair
from fedlab.transport.outbox import Outbox, Outgoing
from fedlab.transport.zmq_common import check_size, io_threads, socket_options

__all__ = ["ZmqNodeTransport"]

log = logging.getLogger("fedlab.transport")
_GOODBYE_LINGER_MS = 300
_RETRY_SECONDS = 10.0
_REFUSED_RETRY_SECONDS = 5.0  # a researcher that refused us may have added our key since


class ZmqNodeTransport:
    def __init__(
        self,
        address: str,
        *,
        node_id: str,
        name: str,
        heartbeat_interval: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        state: Callable[[], str] = lambda: "online",
        key: KeyPair | None = None,
        server_key: str | None = None,
        bulk: bool = True,
    ) -> None:
        """``bulk``: an encrypted node may move large messages over the sealed bulk path, when its
        researcher offers one (docs/transport.md); False keeps everything on CURVE."""
        if (key is None) != (server_key is None):
            raise ValueError("a CURVE node needs both its own key pair and the researcher's public key")
        self.address = address
        self.key, self.server_key = key, server_key
        self.node_id = node_id
        self.name = name
        self.heartbeat_interval = heartbeat_interval
        self.max_message_bytes = max_message_bytes
        self._state = state
        self._on_message: Callable[[Envelope], None] = lambda env: None
        # called (io thread) with each message refused before dispatch, its size and frame count
        self.on_refused: Callable[[DecodeError, int, int], None] = lambda exc, size, n_frames: None
        self._outbox = Outbox()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] = zmq.Context(io_threads=io_threads())
        self._bulk = NodeBulk(node_id, address, max_message_bytes=max_message_bytes) \
            if bulk and key is not None else None
        self.researcher_connected = threading.Event()
        self._pause_until = 0.0
        self._beat_now = threading.Event()
        self._beat_sent = threading.Event()
        self._monitor: HandshakeMonitor | None = None
        self._link_up = False  # a connection to the researcher is up (monitor events; loop thread)
        self._throttle = Throttle()
        self._rebuild_at = float("inf")
        # this process: a restart under the same node id shows as a new session in the heartbeats
        self.session = uuid.uuid4().hex[:12]

    def start(self, on_message: Callable[[Envelope], None]) -> None:
        self._on_message = on_message
        self._thread = threading.Thread(target=self._run, name="fedlab-node-io", daemon=True)
        self._thread.start()

    def send(self, envelope: Envelope) -> None:
        """Queue a message for the researcher (thread-safe). Oversize replies become errors."""
        frames = encode(envelope)
        check_size(frames, self.max_message_bytes)
        bulk = self._bulk
        size = sum(len(f) for f in frames)
        if bulk is not None and size >= bulk.threshold:
            session_id = bulk.route(envelope.msg_id, frames)
            if session_id is not None:  # sealed on the bulk link; its place in the order goes over CURVE
                notice = make_envelope(BulkNotice(session_id=session_id, msg_id=envelope.msg_id, size=size,
                                                  parent_id=envelope.parent_id), self.node_id)
                self._outbox.put(Outgoing(b"", encode(notice), msg_id=envelope.msg_id))
                return
        self._outbox.put(Outgoing(b"", frames, msg_id=envelope.msg_id))

    def announce_pause(self, seconds: float, *, wait: float = 1.0) -> None:
        """Tell the researcher this process may not beat for up to ``seconds`` (0 ends the pause).

        The next heartbeat advertises a longer interval, so the researcher's liveness window
        (a few intervals) covers the pause, and the node does not take its own stalled loop for
        a silent researcher. Waits up to ``wait`` seconds for that heartbeat to leave.
        """
        self._pause_until = time.monotonic() + max(0.0, seconds)
        self._beat_sent.clear()
        self._beat_now.set()
        self._outbox.wake()
        if seconds > 0 and self._thread is not None:
            self._beat_sent.wait(wait)

    def close(self, reason: str = "node stopped") -> None:
        """Tell the researcher we leave, then stop the loop within a fraction of a second."""
        if self._thread is None:
            return
        # always say goodbye: the researcher may know us before we have heard its first beat
        self._outbox.put(Outgoing(b"", encode(make_envelope(Bye(reason=reason), self.node_id))))
        self._stop.set()
        self._outbox.wake()
        self._thread.join(timeout=1.5)
        self._thread = None
        self._outbox.close()
        if self._bulk is not None:
            self._bulk.close()
        self._ctx.term()

    # -- loop ------------------------------------------------------------------------------
    def _connect(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.DEALER)
        socket_options(sock, self.heartbeat_interval, self.max_message_bytes)
        sock.setsockopt(zmq.IDENTITY, self.node_id.encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(int(self.heartbeat_interval * 1000), 100))
        if self.key is not None and self.server_key is not None:
            sock.curve_secretkey = self.key.secret.encode("ascii")
            sock.curve_publickey = self.key.public.encode("ascii")
            sock.curve_serverkey = self.server_key.encode("ascii")
        self._monitor = HandshakeMonitor(sock, connections=True)
        self._rebuild_at = float("inf")
        self._link_up = False
        sock.connect(self.address)
        return sock

    def _disconnect(self, sock: zmq.Socket[Any], linger: int) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        sock.close(linger=linger)

    def _handshakes(self) -> None:
        """Log why a handshake failed (once a minute per reason); plan a retry after a refused key."""
        assert self._monitor is not None
        for event, value in self._monitor.events():
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # zmq's own retry got through: keep this socket
                self._rebuild_at = float("inf")
                self._link_up = True
                self._beat_now.set()  # introduce ourselves on the new connection at once
                if self._bulk is not None:
                    self._bulk.connected()
            if event == zmq.EVENT_DISCONNECTED:
                self._link_up = False
                if self._bulk is not None:
                    self._deliver_all(self._bulk.disconnected())
                if self.researcher_connected.is_set():
                    log.warning("connection to researcher at %s lost; libzmq reconnects", self.address)
                    self.researcher_connected.clear()
                continue
            refusal = node_refusal(event, value, self.address, keyed=self.key is not None)
            if refusal is not None:  # after a refused key or mechanism zmq gives up on the socket: we do not
                self._rebuild_at = min(self._rebuild_at, time.monotonic() + _REFUSED_RETRY_SECONDS)
            if refusal is not None and self._throttle.ready(refusal[0]):
                log.warning("%s", refusal[1])

    def _run(self) -> None:
        sock = self._connect()
        assert self._monitor is not None
        monitor_sock = self._monitor.socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fileno, zmq.POLLIN)
        poller.register(monitor_sock, zmq.POLLIN)
        if self._bulk is not None:
            poller.register(self._bulk.inbox.fileno, zmq.POLLIN)
        pending: list[tuple[float, Outgoing]] = []
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat or self._beat_now.is_set():
                    self._beat_now.clear()
                    self._beat(sock)
                    next_beat = now + self.heartbeat_interval
                    if now >= self._rebuild_at:
                        poller.unregister(sock)
                        poller.unregister(monitor_sock)
                        self._disconnect(sock, 0)
                        sock = self._connect()
                        assert self._monitor is not None
                        monitor_sock = self._monitor.socket
                        poller.register(sock, zmq.POLLIN)
                        poller.register(monitor_sock, zmq.POLLIN)
                timeout = 50 if pending else max(0, int((next_beat - time.monotonic()) * 1000)) + 1
                events = dict(poller.poll(timeout))
                if monitor_sock in events:
                    self._handshakes()
                if self._bulk is not None and self._bulk.inbox.fileno in events:
                    self._deliver_all(self._bulk.inbox.drain())
                if self._outbox.fileno in events or pending:
                    pending += [(time.monotonic(), item) for item in self._outbox.drain() if item]
                    pending = self._send_pending(sock, pending)
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(frames)
                        del frames  # a 100 MB request's frames live as long as its handler needs them, no longer
            # leaving: flush the goodbye and any last replies, briefly
            deadline = time.monotonic() + 0.3
            pending += [(time.monotonic(), item) for item in self._outbox.drain() if item]
            while pending and time.monotonic() < deadline:
                pending = self._send_pending(sock, pending)
                if pending:
                    time.sleep(0.02)
        except Exception:  # pragma: no cover - a bug here must be visible
            log.exception("node transport loop crashed")
        finally:
            self._disconnect(sock, _GOODBYE_LINGER_MS)  # let the goodbye leave; LINGER=0 would drop it

    def _send_pending(self, sock: zmq.Socket[Any], pending: list[tuple[float, Outgoing]]
                      ) -> list[tuple[float, Outgoing]]:
        """Send what can go now; keep what cannot (no researcher yet) for a few seconds."""
        left = []
        for queued_at, item in pending:
            try:
                sock.send_multipart(list(item.frames), zmq.NOBLOCK, copy=False)
            except zmq.Again:  # the queue to the researcher is full (its high-water mark)
                if time.monotonic() - queued_at < _RETRY_SECONDS:
                    left.append((queued_at, item))
                else:
                    log.warning("dropped message %s: the queue to the researcher stayed full for %.0f s",
                                item.msg_id or "(heartbeat)", _RETRY_SECONDS)
        return left

    def _beat(self, sock: zmq.Socket[Any]) -> None:
        if not self._link_up:  # nobody there: a beat would only wait in the queue and arrive stale
            self._beat_sent.set()
            return
        pause_left = self._pause_until - time.monotonic()
        interval = max(self.heartbeat_interval, pause_left / 2)  # liveness is 3 intervals: 1.5x the pause
        beat = make_envelope(Heartbeat(name=self.name, state=self._state(), interval=interval,
                                       session=self.session), self.node_id)
        try:
            sock.send_multipart(encode(beat), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no researcher connected yet: keep knocking
        self._beat_sent.set()
        request = self._bulk.request() if self._bulk is not None else None
        if request is not None:  # after the beat: the researcher knows us before it is asked
            self._outbox.put(Outgoing(b"", encode(request), msg_id=request.msg_id))

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            envelope = decode([f.buffer for f in frames[:MAX_FRAMES + 1]], max_bytes=self.max_message_bytes)
        except DecodeError as exc:
            self._refuse(exc, sum(len(f) for f in frames), len(frames))
            return
        if not self.researcher_connected.is_set():
            log.info("connected to researcher %s at %s", envelope.sender, self.address)
            self.researcher_connected.set()
        content = envelope.content
        if isinstance(content, Heartbeat):  # liveness is libzmq's (monitor events): nothing to record
            return
        bulk = self._bulk
        if bulk is not None and bulk.answered(envelope):
            return
        if isinstance(content, BulkNotice | BulkOffer | BulkRequest):
            if bulk is not None and isinstance(content, BulkNotice):
                self._deliver_all(bulk.inbox.notice(RESEARCHER, content.session_id, content.msg_id,
                                                    content.parent_id, current=bulk.current(content.session_id),
                                                    size=content.size))
            elif self._throttle.ready("bulk"):
                log.warning("ignored a %s from the researcher: this node did not ask for it", envelope.msg_type)
            return
        if bulk is not None:
            self._deliver_all(bulk.inbox.control(RESEARCHER, envelope))
        else:
            self._deliver(envelope)

    def _refuse(self, exc: DecodeError, size: int, n_frames: int) -> None:
        log.warning("refused a message: %s", exc)
        self.on_refused(exc, size, n_frames)
        if exc.header is None or exc.header.msg_type != "error_reply":
            reply, parent = error_reply_for(exc, node=self.node_id)
            self._outbox.put(Outgoing(b"", encode(make_envelope(reply, self.node_id, parent_id=parent))))

    def _deliver(self, envelope: Envelope) -> None:
        """A message in its turn: from CURVE, or from the bulk link at its notice's place."""
        if isinstance(envelope.content, Bye):
            log.info("researcher %s left: %s", envelope.sender, envelope.content.reason)
            self.researcher_connected.clear()
            return
        self._on_message(envelope)

    def _deliver_all(self, ready: list[Ready]) -> None:
        for item in ready:
            if isinstance(item, Control):
                self._deliver(item.envelope)
            elif isinstance(item, Sealed):
                try:
                    envelope = decode(item.frames, max_bytes=self.max_message_bytes)
                except DecodeError as exc:
                    self._refuse(exc, sum(len(f) for f in item.frames), len(item.frames))
                    continue
                self._deliver(envelope)
            else:
                self._lost(item)

    def _lost(self, lost: Lost) -> None:
        """An announced request that will not come: the researcher hears it, as an error reply."""
        log.warning("lost message %s from the researcher: %s", lost.msg_id, lost.reason)
        reply = ErrorReply(code="transfer_lost", node=self.node_id, message=(
            f"request {lost.msg_id} was lost on its way to node {self.name} ({lost.reason}); run it again"))
        self._outbox.put(Outgoing(b"", encode(make_envelope(reply, self.node_id, parent_id=lost.msg_id))))
