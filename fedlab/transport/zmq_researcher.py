"""The researcher's side of the wire: one ROUTER socket owned by one daemon thread.

Nodes connect out to it with DEALER sockets whose identity is their node id. The loop:
receives and validates messages, keeps the :class:`NodeDirectory` up to date from
heartbeats, sends this side's heartbeats, and hands every other message to ``on_message``.
Other threads send through :meth:`send`, which queues frames in an :class:`Outbox`; the
same buffer objects can be queued for many nodes, so a model is serialized once and never
copied per node.

With a ``key`` (and its ``allowlist``) the socket is a CURVE server: traffic is encrypted and
only nodes whose public key is in the allowlist get through the handshake; without, it is
plain TCP, for local demos. A handshake monitor logs refused connections either way.

Liveness comes from libzmq, not from Python: each message's source connection is recorded
(``SRCFD``), ZMTP heartbeats run on libzmq's I/O threads, and the monitor's ``disconnected``
event for a node's connection marks it offline. Monitor events are read before messages in
every turn of the loop, so a connection's end is never applied after a newer connection that
reuses its file descriptor number has spoken.

Nothing is dropped silently: sends never block the loop (``NOBLOCK``; ``ROUTER_MANDATORY``
turns an unknown peer into an error instead of a silent drop), a message that meets a full
queue waits in line and is retried (``router_queue``), and one that cannot leave is logged
with its msg_id and reported to its sender's ``on_failure``.

An encrypted researcher also runs the bulk path (``bulk_researcher``): a node that asks over
CURVE gets a session, dials a second, plain TCP port, and from then on messages of at least
``bulk_threshold`` bytes travel there sealed with AES-256-GCM, while a notice takes their place
in the CURVE stream. Liveness, small messages and the session secrets stay on CURVE.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from fedlab.errors import FedlabTransportError
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
    encode_content,
    error_reply_for,
    make_envelope,
)
from fedlab.transport.bulk_messages import BulkNotice, BulkOffer, BulkRequest
from fedlab.transport.bulk_order import Control, Lost, Ready, Sealed
from fedlab.transport.bulk_researcher import DEFAULT_THRESHOLD, ResearcherBulk, call_once, make_researcher_bulk
from fedlab.transport.bulk_seal import CHUNK_BYTES
from fedlab.transport.curve import AllowlistAuthenticator, HandshakeMonitor, Throttle, researcher_refusal
from fedlab.transport.directory import BUSY, ONLINE, NodeDirectory, NodeRecord
from fedlab.transport.keys import Allowlist, KeyPair
from fedlab.transport.outbox import Outbox, Outgoing
from fedlab.transport.router_queue import RouterQueue
from fedlab.transport.zmq_common import MIN_ZMTP_TIMEOUT_MS, check_size, io_threads, socket_options, source_fd

__all__ = ["MIN_ZMTP_TIMEOUT_MS", "MessageHandler", "ZmqResearcherTransport", "check_size", "io_threads",
           "socket_options"]

log = logging.getLogger("fedlab.transport")
_GOODBYE_LINGER_MS = 300
MessageHandler = Callable[[str, Envelope], None]


class ZmqResearcherTransport:
    def __init__(
        self,
        address: str,
        *,
        researcher_id: str | None = None,
        heartbeat_interval: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        key: KeyPair | None = None,
        allowlist: Allowlist | None = None,
        bulk: bool | str | None = None,
        bulk_advertised_port: int | None = None,
        bulk_threshold: int = DEFAULT_THRESHOLD,
        bulk_chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        """``bulk``: the sealed bulk path of an encrypted researcher (docs/transport.md). None takes
        ``$FEDLAB_BULK`` (default on); True listens on the control port + 1; ``"tcp://HOST:PORT"``
        there; False (or ``"off"``) keeps every message on CURVE. ``bulk_advertised_port`` is the
        port nodes are told to dial when it differs (a port forward); messages of at least
        ``bulk_threshold`` bytes go that way."""
        if (key is None) != (allowlist is None):
            raise FedlabTransportError("a CURVE researcher needs both its key pair and an allowlist of node keys")
        self.address = address
        self.key, self.allowlist = key, allowlist
        self.researcher_id = researcher_id or "researcher-" + uuid.uuid4().hex[:12]
        self.heartbeat_interval = heartbeat_interval
        self.max_message_bytes = max_message_bytes
        self.directory = NodeDirectory()
        self._on_message: MessageHandler = lambda node_id, env: None
        self._outbox = Outbox()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._auth: AllowlistAuthenticator | None = None
        self._monitor: HandshakeMonitor | None = None
        self._throttle = Throttle()
        # when the loop last found no message waiting: a node is judged silent only up to then,
        # so a flood that keeps the loop busy cannot make it miss heartbeats still queued
        self._caught_up = time.time()
        self._router = RouterQueue()  # messages that met a full queue wait in line there (loop thread)
        # only an encrypted researcher has one: a plain one sends everything as fast over its one socket
        self._bulk: ResearcherBulk | None = make_researcher_bulk(
            address, bulk, advertised_port=bulk_advertised_port, threshold=bulk_threshold,
            chunk_bytes=bulk_chunk_bytes, max_message_bytes=max_message_bytes) if key is not None else None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, on_message: MessageHandler) -> None:
        """Bind and start the loop thread. Raise FedlabTransportError if the address is unusable."""
        self._on_message = on_message
        ctx: zmq.Context[Any] = zmq.Context(io_threads=io_threads())
        sock = ctx.socket(zmq.ROUTER)
        socket_options(sock, self.heartbeat_interval, self.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.key is not None and self.allowlist is not None:
            # the ZAP handler must answer before the first node knocks: zmq lets everyone in without one
            self._auth = AllowlistAuthenticator(ctx, self.allowlist)
            self._auth.start()
            sock.curve_secretkey = self.key.secret.encode("ascii")
            sock.curve_publickey = self.key.public.encode("ascii")
            sock.curve_server = True
        self._monitor = HandshakeMonitor(sock, connections=True)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as exc:
            self._monitor.close()
            sock.close(0)
            self._stop_auth()
            ctx.term()
            raise FedlabTransportError(
                f"cannot listen on {self.address}: {exc.strerror}. Is another researcher running "
                "there? Pick another address, e.g. Researcher('tcp://127.0.0.1:5556')."
            ) from None
        self._ctx, self._sock = ctx, sock
        if self._bulk is not None and not self._bulk.start():
            self._bulk = None
        self._thread = threading.Thread(target=self._run, name="fedlab-researcher-io", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Say goodbye to the nodes, stop the loop and release the port (within a second)."""
        if self._thread is None:
            return
        if self._bulk is not None:
            self._bulk.closing()
        for rec in self.directory.records():
            self.send_nowait(rec.node_id, make_envelope(Bye(reason="researcher closed"), self.researcher_id))
        self._stop.set()
        self._outbox.wake()
        self._thread.join(timeout=2.0)
        self._thread = None
        self._outbox.close()
        if self._bulk is not None:
            self._bulk.close()
        self._stop_auth()
        if self._ctx is not None:
            self._ctx.term()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    @property
    def bulk(self) -> ResearcherBulk | None:
        """The sealed bulk path, when this researcher has one running (encrypted, port bound)."""
        return self._bulk

    # -- API used by researcher/ -------------------------------------------------------------
    def nodes(self) -> list[NodeRecord]:
        return self.directory.records()

    def send(
        self,
        node_id: str,
        envelope: Envelope,
        *,
        content_frame: bytes | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """Queue ``envelope`` for ``node_id``. ``on_failure(reason)`` runs if it cannot leave."""
        frames = encode(envelope, content_frame)
        check_size(frames, self.max_message_bytes)
        if self._thread is None:
            raise FedlabTransportError("the researcher's transport is not running; use it inside "
                                       "`with Researcher(...)` or call .start()")
        bulk = self._bulk
        size = sum(len(f) for f in frames)
        if bulk is not None and size >= bulk.threshold:
            once = call_once(on_failure)
            session_id = bulk.route(node_id, envelope.msg_id, frames, once)
            if session_id is not None:  # sealed on the bulk link; its place in the order goes over CURVE
                notice = make_envelope(BulkNotice(session_id=session_id, msg_id=envelope.msg_id, size=size,
                                                  parent_id=envelope.parent_id), self.researcher_id)
                self._outbox.put(Outgoing(node_id.encode(), encode(notice), once, envelope.msg_id))
                return
        self._outbox.put(Outgoing(node_id.encode(), frames, on_failure, envelope.msg_id))

    def send_nowait(self, node_id: str, envelope: Envelope) -> None:
        if self._thread is not None:
            self._outbox.put(Outgoing(node_id.encode(), encode(envelope), msg_id=envelope.msg_id))

    # -- loop (owns the socket) --------------------------------------------------------------
    def _run(self) -> None:
        assert self._sock is not None and self._monitor is not None
        sock, monitor = self._sock, self._monitor
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fileno, zmq.POLLIN)
        poller.register(monitor.socket, zmq.POLLIN)
        if self._bulk is not None:
            poller.register(self._bulk.inbox.fileno, zmq.POLLIN)
        next_beat = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(sock)
                    next_beat = now + self.heartbeat_interval
                timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000)) + 1
                events = dict(poller.poll(20 if self._router.waiting else timeout_ms))
                self._handshakes(monitor)  # first: a connection's end before any newer connection's messages
                if sock not in events:
                    self._caught_up = time.time()
                if self._router.waiting:
                    self._router.retry(sock)
                if self._bulk is not None and self._bulk.inbox.fileno in events:
                    self._deliver_all(sock, self._bulk.inbox.drain())
                if self._outbox.fileno in events or self._stop.is_set():
                    stop = self._flush(sock)
                    if stop or self._stop.is_set():
                        self._flush(sock)
                        return
                if sock in events:
                    for _ in range(1000):  # drain what is there, but keep heartbeats on time
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            self._caught_up = time.time()
                            break
                        self._receive(sock, frames)
                        del frames  # a 100 MB reply lives as long as its request needs it, no longer
        except Exception:  # pragma: no cover - a bug here must be visible, not silent
            log.exception("researcher transport loop crashed")
        finally:
            monitor.close()
            sock.close(linger=_GOODBYE_LINGER_MS)  # let the goodbye leave; LINGER=0 would drop it

    def _handshakes(self, monitor: HandshakeMonitor) -> None:
        for event, value in monitor.events():
            if event == zmq.EVENT_DISCONNECTED:
                for node_id in self.directory.connection_closed(value):
                    log.info("node %s: its connection closed; offline until it reconnects", node_id)
                if self._bulk is not None and self._sock is not None:
                    self._deliver_all(self._sock, self._bulk.connection_closed(value))
                continue
            refusal = researcher_refusal(event, value, keyed=self.key is not None)
            if refusal is not None and self._throttle.ready(refusal[0]):
                log.warning("%s", refusal[1])

    def _flush(self, sock: zmq.Socket[Any]) -> bool:
        stop = False
        for item in self._outbox.drain():
            if item is None:
                stop = True
                continue
            self._send_frames(sock, item)
        return stop

    def _send_frames(self, sock: zmq.Socket[Any], item: Outgoing) -> None:
        self._router.send(sock, item)

    def _heartbeat(self, sock: zmq.Socket[Any]) -> None:
        self.directory.sweep(self._caught_up)
        beat = make_envelope(
            Heartbeat(name=self.researcher_id, state=ONLINE, interval=self.heartbeat_interval),
            self.researcher_id,
        )
        content = encode_content(beat.content)
        for rec in self.directory.records():
            if self.directory.is_connected(rec.node_id):
                self._send_frames(sock, Outgoing(rec.node_id.encode(), encode(beat, content)))

    def _receive(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        node_id = frames[0].bytes.decode("utf-8", "replace")
        if self.allowlist is not None:  # the key the ZAP handler accepted, as its user id
            key = frames[-1].get("User-Id")
            wrong = self.allowlist.impersonation(str(key), node_id)
            if wrong is not None:
                if self._throttle.ready("impersonation " + node_id):
                    log.warning("dropped a message: %s; check that node's allowlist line", wrong)
                return
        try:
            envelope = decode([f.buffer for f in frames[1:MAX_FRAMES + 2]], max_bytes=self.max_message_bytes)
        except DecodeError as exc:
            self._refuse(sock, frames[0].bytes, node_id, exc)
            return
        content = envelope.content
        connection = source_fd(frames[0])
        if isinstance(content, Heartbeat):
            state = BUSY if content.state == BUSY else ONLINE
            self.directory.seen(node_id, content.name, state, content.interval, content.session, connection)
            return
        if not isinstance(content, Bye):
            self.directory.seen(node_id, connection=connection)
        if isinstance(content, BulkRequest):
            self._offer_bulk(sock, node_id, envelope, connection)
        elif isinstance(content, BulkNotice | BulkOffer):
            if self._bulk is None or isinstance(content, BulkOffer):
                if self._throttle.ready("bulk " + node_id):
                    log.warning("ignored a %s from node %s: this researcher offered it no bulk session",
                                envelope.msg_type, node_id)
                return
            self._deliver_all(sock, self._bulk.inbox.notice(
                node_id, content.session_id, content.msg_id, content.parent_id,
                current=self._bulk.current(node_id, content.session_id), size=content.size))
        elif self._bulk is not None:
            self._deliver_all(sock, self._bulk.inbox.control(node_id, envelope))
        else:
            self._deliver(node_id, envelope)

    def _deliver(self, node_id: str, envelope: Envelope) -> None:
        """A message in its turn: from CURVE, or from the bulk link at its notice's place."""
        content = envelope.content
        if isinstance(content, Bye):
            log.info("node %s said goodbye: %s", node_id, content.reason)
            self.directory.offline(node_id)
            if self._bulk is not None and self._sock is not None:
                self._deliver_all(self._sock, self._bulk.node_left(node_id))
            return
        if isinstance(content, ErrorReply) and envelope.parent_id is None:
            log.warning("node %s reported: [%s] %s", node_id, content.code, content.message)
            return
        try:
            self._on_message(node_id, envelope)
        except Exception:
            log.exception("handling a message from %s failed", node_id)

    def _deliver_all(self, sock: zmq.Socket[Any], ready: list[Ready]) -> None:
        for item in ready:
            if isinstance(item, Control):
                self._deliver(item.peer, item.envelope)
            elif isinstance(item, Sealed):
                try:
                    envelope = decode(item.frames, max_bytes=self.max_message_bytes)
                except DecodeError as exc:
                    self._refuse(sock, item.peer.encode(), item.peer, exc)
                    continue
                self._deliver(item.peer, envelope)
            else:
                self._lost(item)

    def _lost(self, lost: Lost) -> None:
        """An announced bulk message that will not come: its request hears it, as an error."""
        log.warning("lost message %s from node %s: %s", lost.msg_id, lost.peer, lost.reason)
        if lost.parent_id is None:
            return
        reply = ErrorReply(code="transfer_lost", message=(
            f"node {lost.peer}'s reply {lost.msg_id} was lost on its way ({lost.reason}); run the request again"))
        self._deliver(lost.peer, make_envelope(reply, self.researcher_id, parent_id=lost.parent_id))

    def _offer_bulk(self, sock: zmq.Socket[Any], node_id: str, request: Envelope, connection: int | None) -> None:
        if self._bulk is None:
            answer: Any = ErrorReply(code="unavailable", message="this researcher does not offer the bulk path "
                                     "(it is off, or its port could not be had): every message goes over CURVE")
        else:
            answer, ready = self._bulk.offer(node_id, connection)
            self._deliver_all(sock, ready)
        self._send_frames(sock, Outgoing(node_id.encode(), encode(
            make_envelope(answer, self.researcher_id, parent_id=request.msg_id))))

    def _refuse(self, sock: zmq.Socket[Any], peer: bytes, node_id: str, exc: DecodeError) -> None:
        log.warning("refused a message from %s: %s", node_id, exc)
        if exc.header is None or exc.header.msg_type != "error_reply":
            reply, parent = error_reply_for(exc)
            self._send_frames(sock, Outgoing(peer, encode(make_envelope(reply, self.researcher_id, parent_id=parent))))

