"""A kernel's transport when a researcher service holds the nodes' socket: ``ServiceClientTransport``.

It has the interface of :class:`ZmqResearcherTransport` (``start(on_message)``, ``close()``,
``nodes()``, ``send(...)``, ``send_nowait(...)``, ``researcher_id``, ``directory``), so the
request layer and every job above it run unchanged in the kernel; only the socket is elsewhere.
It attaches to the service over the local link (``fedlab.transport.service_link``): a hello, the
service's welcome with its nodes (so an attached kernel sees them online at once, without any
node reconnecting), then envelopes both ways, each node message delivered only to the kernel
whose request it answers. ``directory`` mirrors the service's node directory: the service sends
every status change as it happens and a snapshot every heartbeat, and the mirror tells the
request layer's listeners as the real directory would (a node going offline, or restarted).

If the service goes away (stopped, killed), the mirror marks every node offline at once, so the
requests waiting end as ``disconnected``, and every later call raises a
:class:`~fedlab.errors.FedlabTransportError` saying so and what to do; the kernel may then
connect again (to a new service, or binding the address itself).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from fedlab.errors import FedlabTransportError
from fedlab.protocol import DEFAULT_MAX_MESSAGE_BYTES, DecodeError, Envelope, Event, decode, encode
from fedlab.transport.directory import OFFLINE, ONLINE, NodeDirectory, NodeRecord
from fedlab.transport.outbox import Outbox, Outgoing
from fedlab.transport.service_bulk import BULK, BULK_MIN_BYTES, Borrower, Lender
from fedlab.transport.service_files import ServiceInfo
from fedlab.transport.service_link import (
    Bye,
    Deliver,
    Failed,
    Hello,
    NodeInfo,
    Nodes,
    Ready,
    Release,
    Send,
    Unmap,
    Welcome,
    decode_link,
    encode_link,
    link_options,
    peer_credentials,
)
from fedlab.transport.zmq_common import close_monitored
from fedlab.transport.zmq_researcher import MessageHandler, check_size

__all__ = ["MirrorDirectory", "ServiceClientTransport", "control"]

log = logging.getLogger("fedlab.transport")
_FAILURE_TTL_S = 3 * 3600.0


class MirrorDirectory(NodeDirectory):
    """The service's node directory, as this kernel last heard it (times as the service saw them)."""

    def __init__(self) -> None:
        super().__init__()
        self._times: dict[str, tuple[float, float]] = {}

    def apply(self, infos: Iterable[NodeInfo]) -> None:
        """Take the service's records; listeners hear each change (status, a new session) as they happen."""
        for info in infos:
            self._times[info.node_id] = (info.last_seen, info.first_seen)
            if info.status == OFFLINE:
                if super().get(info.node_id) is None:
                    self.seen(info.node_id, info.name, ONLINE, info.heartbeat_interval, info.session)
                self.offline(info.node_id)
            else:
                self.seen(info.node_id, info.name, info.status, info.heartbeat_interval, info.session)

    def all_offline(self) -> None:
        for rec in super().records():
            self.offline(rec.node_id)

    def _patched(self, rec: NodeRecord) -> NodeRecord:
        times = self._times.get(rec.node_id)
        return rec if times is None else replace(rec, last_seen=times[0], first_seen=times[1])

    def get(self, node_id: str) -> NodeRecord | None:
        rec = super().get(node_id)
        return None if rec is None else self._patched(rec)

    def records(self) -> list[NodeRecord]:
        return [self._patched(r) for r in super().records()]


class ServiceClientTransport:
    """The researcher's transport, through the researcher service described by ``info``."""

    def __init__(self, info: ServiceInfo, *, researcher_id: str | None = None, label: str = "",
                 connect_timeout: float = 10.0) -> None:
        self.service = info
        self.address = info.address
        self.researcher_id = researcher_id or "researcher-" + uuid.uuid4().hex[:12]
        self.kernel_id = "kernel-" + uuid.uuid4().hex[:12]
        self.label = label
        self.connect_timeout = connect_timeout
        self.directory = MirrorDirectory()
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.heartbeat_interval = 1.0
        self.public_key: str | None = info.public_key
        self.welcome: Welcome | None = None
        self._on_message: MessageHandler = lambda node_id, env: None
        self._failure: FedlabTransportError | None = None
        self._failures: dict[str, tuple[Callable[[str], None], float]] = {}
        self._failures_lock = threading.Lock()
        self._outbox = Outbox()
        self._backlog: deque[list[Any]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._lender: Lender | None = None  # this kernel's files: the large buffers it sends
        self._borrower: Borrower | None = None  # the service's files: the nodes' large replies

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, on_message: MessageHandler) -> None:
        """Attach to the service; raise FedlabTransportError if it does not welcome this kernel in time."""
        self._on_message = on_message
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.kernel_id.encode())
        link_options(sock, self.max_message_bytes)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.service.endpoint)
        self._ctx, self._sock = ctx, sock
        try:
            self._handshake(sock)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="fedlab-service-client", daemon=True)
        self._thread.start()

    def _handshake(self, sock: zmq.Socket[Any]) -> None:
        lender = Lender() if BULK else None
        probe = lender.probe() if lender is not None else None
        sock.send_multipart(encode_link(Hello(self.kernel_id, os.getpid(), self.researcher_id, self.label,
                                              probe=probe)))
        deadline = time.monotonic() + self.connect_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                if lender is not None:
                    lender.close()
                raise FedlabTransportError(
                    f"the researcher service for {self.address} (pid {self.service.pid}) did not answer within "
                    f"{self.connect_timeout:g} s; see its log, or stop it (`fedlab researcher stop --address "
                    f"{self.address}`) and connect again")
            frames = sock.recv_multipart(copy=False)
            try:
                message = decode_link(frames[0].buffer)
            except ValueError as exc:
                raise FedlabTransportError(f"the researcher service for {self.address} answered with something "
                                           f"else than a fedlab link message ({exc}); is it the same fedlab "
                                           "version as this kernel?") from None
            if isinstance(message, Welcome):
                break
            if isinstance(message, Bye):
                raise FedlabTransportError(f"the researcher service for {self.address} refused this kernel: "
                                           f"{message.reason}")
        creds = peer_credentials(frames[0])
        if creds is not None and creds[1] != os.getuid():
            raise FedlabTransportError(f"the process behind the researcher service's socket {self.service.endpoint} "
                                       f"runs as user id {creds[1]}, not as you: refusing to attach")
        self.welcome = message
        self.max_message_bytes = message.max_message_bytes
        self.heartbeat_interval = message.heartbeat_interval
        self.public_key = message.public_key
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + 1024 * 1024)
        self.directory.apply(message.nodes)
        self._lender = lender if message.bulk_in else None
        if lender is not None and not message.bulk_in:
            lender.close()
        bulk_out = False
        if message.probe is not None and creds is not None:
            self._borrower = Borrower(creds[0], self._release, writable=True)
            bulk_out = self._borrower.check_probe(message.probe)
            if not bulk_out:
                self._borrower = None
        sock.send_multipart(encode_link(Ready(bulk_out)))

    def close(self) -> None:
        """Detach from the service (the nodes stay connected to it); drop this kernel's requests in flight."""
        if self._thread is not None:
            if self._failure is None:
                self._outbox.put(Outgoing(b"", encode_link(Bye("the kernel's researcher closed"))))
            self._stop.set()
            self._outbox.wake()
            self._thread.join(timeout=2.0)
            self._thread = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        close_monitored(self._sock, self._monitor, linger_ms=200)  # let the goodbye leave
        self._sock = self._monitor = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for part in (self._lender, self._borrower):
            if part is not None:
                part.close()
        self._lender = self._borrower = None
        self._outbox.close()

    # -- the interface the request layer uses -----------------------------------------------------
    def nodes(self) -> list[NodeRecord]:
        self._check()
        return self.directory.records()

    def send(self, node_id: str, envelope: Envelope, *, content_frame: bytes | None = None,
             on_failure: Callable[[str], None] | None = None) -> None:
        """Queue ``envelope`` for ``node_id`` through the service; ``on_failure(reason)`` if it cannot leave."""
        self._check()
        frames = encode(envelope, content_frame)
        check_size(frames, self.max_message_bytes)
        self._queue(node_id, envelope, frames, on_failure)

    def send_nowait(self, node_id: str, envelope: Envelope) -> None:
        if self._thread is not None and self._failure is None:
            self._queue(node_id, envelope, encode(envelope), None)

    def _queue(self, node_id: str, envelope: Envelope, frames: list[Any],
               on_failure: Callable[[str], None] | None) -> None:
        bulk = None
        lender = self._lender
        if lender is not None and sum(len(f) for f in frames[2:]) >= BULK_MIN_BYTES:
            bulk = lender.place(frames[2:])
            if bulk is not None:
                frames = frames[:2]
        if on_failure is not None:
            with self._failures_lock:
                self._failures[envelope.msg_id] = (on_failure, time.monotonic())
        self._outbox.put(Outgoing(b"", encode_link(Send(node_id, on_failure is not None, bulk), frames),
                                  msg_id=envelope.msg_id))

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._thread is None:
            raise FedlabTransportError("the researcher's transport is not running; use it inside "
                                       "`with Researcher(...)` or call .start()")

    # -- the loop (owns the socket) --------------------------------------------------------------
    def _run(self) -> None:
        assert self._sock is not None and self._monitor is not None
        sock, monitor = self._sock, self._monitor
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._outbox.fileno, zmq.POLLIN)
        next_sweep = time.monotonic() + 10
        try:
            while self._failure is None:
                events = dict(poller.poll(50 if self._backlog else 500))
                if monitor in events and self._disconnected(monitor):
                    self._fail("went away (its connection closed: it was stopped or killed)")
                    return
                if self._outbox.fileno in events or self._stop.is_set():
                    self._backlog.extend(list(item.frames) for item in self._outbox.drain() if item is not None)
                self._flush(sock)
                if self._stop.is_set():
                    return
                if sock in events:
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(frames)
                        del frames
                if time.monotonic() > next_sweep:
                    next_sweep = time.monotonic() + 10
                    self._sweep_failures()
                    for token in self._lender.trim() if self._lender is not None else []:
                        self._backlog.append(encode_link(Unmap(token)))
        except Exception:  # pragma: no cover - a bug here must be visible, not silent
            log.exception("the researcher service client's loop crashed")
            self._fail("could not be reached: this kernel's link to it failed (see the log)")

    def _flush(self, sock: zmq.Socket[Any]) -> None:
        while self._backlog:
            try:
                sock.send_multipart(self._backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._backlog.popleft()

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            message = decode_link(frames[0].buffer)
        except ValueError as exc:
            log.warning("refused a message from the researcher service: %s", exc)
            return
        if isinstance(message, Deliver):
            self._deliver(message, frames[1:])
        elif isinstance(message, Nodes):
            self.directory.apply(message.nodes)
        elif isinstance(message, Failed):
            with self._failures_lock:
                entry = self._failures.pop(message.msg_id, None)
            if entry is not None:
                entry[0](message.reason)
        elif isinstance(message, Release) and self._lender is not None:
            self._lender.release(message.token, message.seq)
        elif isinstance(message, Unmap) and self._borrower is not None:
            self._borrower.forget(message.token)
        elif isinstance(message, Bye):
            self._fail(f"stopped ({message.reason})")

    def _deliver(self, message: Deliver, payload: list[zmq.Frame]) -> None:
        frames: list[Any] = [f.buffer for f in payload]
        try:
            if message.bulk is not None:
                if self._borrower is None:
                    raise ValueError("large buffers by memory file, which this kernel cannot map")
                frames += self._borrower.views(message.bulk)
            envelope = decode(frames, max_bytes=self.max_message_bytes)
        except (DecodeError, ValueError, OSError) as exc:
            log.warning("refused a message from node %s relayed by the researcher service: %s", message.node_id, exc)
            return
        del frames
        if envelope.parent_id and not isinstance(envelope.content, Event):
            with self._failures_lock:
                self._failures.pop(envelope.parent_id, None)
        try:
            self._on_message(message.node_id, envelope)
        except Exception:
            log.exception("handling a message from %s failed", message.node_id)

    def _release(self, token: str, seq: int) -> None:
        """A reply's buffers are all gone (any thread): the service may write that file again."""
        if self._failure is None and self._thread is not None:
            self._outbox.put(Outgoing(b"", encode_link(Release(token, seq))))

    def _disconnected(self, monitor: zmq.Socket[Any]) -> bool:
        gone = False
        while True:
            try:
                event: Any = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return gone
            gone = gone or int(event["event"]) == zmq.EVENT_DISCONNECTED

    def _fail(self, what: str) -> None:
        """The service is gone: every node offline (pending requests end), every later call raises."""
        self._failure = FedlabTransportError(
            f"the researcher service for {self.address} (pid {self.service.pid}) {what}; this researcher can no "
            f"longer reach the nodes. Start it again (`fedlab researcher start --address {self.address}`) and "
            "connect again (`%fed connect`, or a new fedlab.Researcher), which binds the address in this kernel "
            "when no service runs")
        log.warning("%s", self._failure)
        self.directory.all_offline()
        with self._failures_lock:
            entries, self._failures = list(self._failures.values()), {}
        for callback, _ in entries:
            try:
                callback("the researcher service went away")
            except Exception:  # pragma: no cover - a request's own bookkeeping
                log.exception("a send failure callback failed")

    def _sweep_failures(self) -> None:
        limit = time.monotonic() - _FAILURE_TTL_S
        with self._failures_lock:
            for msg_id in [m for m, (_, t) in self._failures.items() if t < limit]:
                del self._failures[msg_id]


def control(info: ServiceInfo, message: Any, *, timeout: float = 10.0) -> Any:
    """Send one control message (status, stop) to the service ``info`` names; its answer."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.ROUTING_ID, ("control-" + uuid.uuid4().hex[:12]).encode())
        link_options(sock, DEFAULT_MAX_MESSAGE_BYTES)
        sock.connect(info.endpoint)
        sock.send_multipart(encode_link(message))
        if not sock.poll(int(timeout * 1000)):
            raise FedlabTransportError(f"the researcher service for {info.address} (pid {info.pid}) did not answer "
                                       f"within {timeout:g} s")
        frames = sock.recv_multipart(copy=False)
        creds = peer_credentials(frames[0])
        if creds is not None and creds[1] != os.getuid():
            raise FedlabTransportError(f"the process behind {info.endpoint} runs as user id {creds[1]}, not as you")
        return decode_link(frames[0].buffer)
    finally:
        sock.close(0)
        ctx.term()
