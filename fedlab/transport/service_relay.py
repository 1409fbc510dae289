"""The researcher service's relay: the nodes' socket on one side, the attached kernels on the other.

The service runs the real :class:`ZmqResearcherTransport` (the socket the nodes dial, its keys,
allowlist and node directory) and one loop thread that owns the local ``ipc://`` ROUTER the
kernels attach to (``fedlab.transport.service_link``). The loop

* relays each kernel's envelopes to their node, after decoding and validating them as the nodes
  will, and records the route (``service_routes``) so the node's replies and progress events go
  back to the kernel that asked, and to no other;
* tells every kernel of every node status change at once, and sends all of them a snapshot of
  the directory every heartbeat (``last_seen``);
* detaches a kernel that says goodbye, or whose connection ends (the process died: its monitor
  event comes at once), dropping its requests in flight with a log line; a node's reply for a
  kernel that has gone is discarded and logged, never delivered elsewhere.

Large buffers lie in memory files (``service_bulk``): a kernel's model is mapped here and handed
to the node socket as views (no copy), a node's reply is copied once into a file of this service
that the kernel maps. The transport's thread only queues node messages for the loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from fedlab.errors import FedlabError
from fedlab.protocol import DecodeError, Envelope, Event, decode, encode
from fedlab.transport.directory import RESTARTED, NodeRecord
from fedlab.transport.service_bulk import BULK, BULK_MIN_BYTES, Borrower, Lender
from fedlab.transport.service_kernels import AttachedKernel, KernelSender, WakeQueue
from fedlab.transport.service_link import (
    LINK_VERSION,
    BulkRef,
    Bye,
    Deliver,
    Failed,
    Hello,
    KernelInfo,
    NodeInfo,
    Nodes,
    Ready,
    Release,
    Send,
    StatusQuery,
    StatusReply,
    StopRequest,
    Unmap,
    Welcome,
    decode_link,
    link_options,
    peer_credentials,
)
from fedlab.transport.service_routes import RouteTable
from fedlab.transport.zmq_common import close_monitored
from fedlab.transport.zmq_researcher import ZmqResearcherTransport

__all__ = ["ServiceRelay", "node_info"]

log = logging.getLogger("fedlab.service")
_SNAPSHOT_S = 1.0


def node_info(rec: NodeRecord) -> NodeInfo:
    return NodeInfo(rec.node_id, rec.name, rec.status, rec.last_seen, rec.first_seen, rec.heartbeat_interval,
                    rec.session)


class ServiceRelay:
    """Serve ``transport``'s nodes to the kernels attaching at ``endpoint`` (``ipc://PATH``)."""

    def __init__(self, transport: ZmqResearcherTransport, endpoint: str, *, started: float | None = None) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.started = time.time() if started is None else started
        self.routes = RouteTable()
        self.kernels: dict[bytes, AttachedKernel] = {}
        self.discarded = 0
        self.stop_requested = threading.Event()
        self._stop_reason = ""
        self._wake = WakeQueue()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._out = KernelSender(self._unreachable)
        self._monitor: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._uid = os.getuid()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the local socket (mode 0600), start the nodes' transport, then the loop."""
        sock = self._ctx.socket(zmq.ROUTER)
        link_options(sock, self.transport.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        path = self.endpoint[len("ipc://"):]
        old = os.umask(0o077)  # the socket file is born 0600; the directory (0700) is what keeps others out
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise FedlabError(f"cannot listen on the local socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock = self._out.sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.transport.directory.add_listener(lambda node_id, event: self._wake.put("status", node_id, event))
        try:
            self.transport.start(lambda node_id, envelope: self._wake.put("node", node_id, envelope))
        except BaseException:
            self._close_sockets()
            self._wake.close()
            self._ctx.term()
            raise
        self._thread = threading.Thread(target=self._run, name="fedlab-service-link", daemon=True)
        self._thread.start()

    def stop(self, reason: str | None = None) -> None:
        """Tell the kernels (why: ``reason``, else the one given to ``request_stop``), stop the loop, close
        the nodes' transport (which says goodbye to them)."""
        if self._thread is None:
            return
        if reason:
            self._stop_reason = reason
        self._wake.put("stop")
        self._thread.join(timeout=5.0)
        self._thread = None
        self.transport.close()
        self._wake.close()
        self._ctx.term()
        self.stop_requested.set()

    def request_stop(self, reason: str) -> None:
        """Ask the owner of this relay (its main thread, waiting on ``stop_requested``) to stop it."""
        self._stop_reason = reason
        self.stop_requested.set()

    @property
    def stop_reason(self) -> str:
        return self._stop_reason

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._sock is not None and self._monitor is not None
        sock, monitor = self._sock, self._monitor
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        next_snapshot = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(timeout=100 if any(k.backlog for k in self.kernels.values()) else 500))
                if monitor in events:
                    self._connections_closed(monitor)
                if self._wake.read_fd in events:
                    if not self._work(self._wake.drain()):
                        break
                if sock in events:
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._from_kernel(frames)
                self._out.flush(list(self.kernels.values()))
                if time.monotonic() >= next_snapshot:
                    next_snapshot = time.monotonic() + _SNAPSHOT_S
                    self._snapshot()
        except Exception:  # pragma: no cover - a bug here must be visible
            log.exception("the researcher service's link loop crashed")
            self.request_stop("its link loop crashed (see its log)")
        finally:
            for kernel in list(self.kernels.values()):
                self._out.send(kernel, Bye(self._stop_reason or "the researcher service stopped"))
                self._detach(kernel, "the service is stopping", quiet=True)
            self._close_sockets()

    def _close_sockets(self) -> None:
        close_monitored(self._sock, self._monitor)
        self._sock = self._out.sock = self._monitor = None

    def _work(self, items: Sequence[tuple[Any, ...]]) -> bool:
        """Handle what other threads queued; False to stop the loop."""
        for item in items:
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "node":
                self._from_node(item[1], item[2])
            elif kind == "status":
                self._node_changed(item[1], item[2])
            elif kind == "failed":
                self._failed(item[1], item[2], item[3])
            elif kind == "release":
                kernel = self.kernels.get(item[1])
                if kernel is not None:
                    self._out.send(kernel, Release(item[2], item[3]))
        return True

    # -- kernels -> nodes ------------------------------------------------------------------------
    def _from_kernel(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        if len(frames) < 2:
            return
        try:
            message = decode_link(frames[1].buffer)
        except ValueError as exc:
            log.warning("refused a local message: %s", exc)
            return
        kernel = self.kernels.get(peer)
        if isinstance(message, Send) and kernel is not None:
            self._relay(kernel, message, frames[2:])
        elif isinstance(message, Release) and kernel is not None and kernel.lender is not None:
            kernel.lender.release(message.token, message.seq)
        elif isinstance(message, Unmap) and kernel is not None and kernel.borrower is not None:
            kernel.borrower.forget(message.token)
        elif isinstance(message, Ready) and kernel is not None:
            if not message.bulk_out and kernel.lender is not None:
                kernel.lender.close()
                kernel.lender = None
        elif isinstance(message, Bye) and kernel is not None:
            self._detach(kernel, f"it detached ({message.reason})")
        elif isinstance(message, Hello | StatusQuery | StopRequest):
            creds = peer_credentials(frames[1])
            if creds is not None and creds[1] != self._uid:
                log.warning("refused a local connection from pid %d of user id %d: only user id %d may attach",
                            creds[0], creds[1], self._uid)
                self._out.raw(peer, Bye(f"refused: this researcher service belongs to user id {self._uid}"))
                return
            if isinstance(message, Hello):
                self._attach(peer, message, frames[1], creds)
            elif isinstance(message, StatusQuery):
                self._out.raw(peer, self.status())
            else:
                log.info("asked to stop by pid %s", creds[0] if creds else "?")
                self._out.raw(peer, Bye("stopping"))
                self.request_stop("it was asked to stop (`fedlab researcher stop`)")
        elif kernel is None:
            self._out.raw(peer, Bye("not attached: say hello first"))

    def _attach(self, peer: bytes, hello: Hello, frame: zmq.Frame, creds: tuple[int, int] | None) -> None:
        if hello.version != LINK_VERSION:
            self._out.raw(peer, Bye(f"this researcher service speaks link version {LINK_VERSION}, the kernel "
                                     f"{hello.version}: run the same fedlab version in both (restart the service)"))
            return
        old = self.kernels.get(peer)
        if old is not None:
            self._detach(old, "it attached again", quiet=True)
        pid = creds[0] if creds is not None else hello.pid
        connection = _source_fd(frame)
        kernel = AttachedKernel(hello.kernel_id, peer, pid, hello.researcher_id, hello.label, connection)
        bulk_in = False
        if BULK and hello.probe is not None and creds is not None:
            def release(token: str, seq: int, p: bytes = peer) -> None:
                self._wake.put("release", p, token, seq)

            kernel.borrower = Borrower(pid, release)
            bulk_in = kernel.borrower.check_probe(hello.probe)
            if not bulk_in:
                kernel.borrower = None
        probe = None
        if BULK and creds is not None:
            kernel.lender = Lender()
            probe = kernel.lender.probe()
        self.kernels[peer] = kernel
        t = self.transport
        allowlist = str(t.allowlist.path) if t.allowlist is not None else None
        self._out.send(kernel, Welcome(os.getpid(), t.address, t.researcher_id, self.started,
                                   t.key.public if t.key is not None else None, allowlist,
                                   t.max_message_bytes, t.heartbeat_interval, [node_info(r) for r in t.nodes()],
                                   bulk_in, probe))
        log.info("%s attached (researcher id %s; large buffers %s)", kernel.describe(), kernel.researcher_id,
                 "through memory files" if bulk_in else "through the socket")

    def _relay(self, kernel: AttachedKernel, send: Send, payload: Sequence[zmq.Frame]) -> None:
        frames: list[Any] = [f.buffer for f in payload]
        msg_id = ""
        try:
            if send.bulk is not None:
                if kernel.borrower is None:
                    raise ValueError("large buffers by memory file, which this kernel could not share at attach")
                frames += kernel.borrower.views(send.bulk)
            envelope = decode(frames, max_bytes=self.transport.max_message_bytes)
        except (DecodeError, ValueError, OSError) as exc:
            header = getattr(exc, "header", None)
            msg_id = header.msg_id if header is not None else ""
            log.warning("refused a message of %s for node %s: %s", kernel.describe(), send.node_id, exc)
            if msg_id:
                self._out.send(kernel, Failed(msg_id, f"the researcher service refused it: {exc}"))
            return
        msg_id = envelope.msg_id
        self.routes.add(msg_id, kernel.kernel_id, send.node_id, envelope.msg_type)
        on_failure = None
        if send.report:
            def on_failure(reason: str, p: bytes = kernel.peer, m: str = msg_id) -> None:
                self._wake.put("failed", p, m, reason)
        try:
            self.transport.send(send.node_id, envelope, content_frame=cast(bytes, frames[1]), on_failure=on_failure)
        except FedlabError as exc:
            self.routes.pop(msg_id)
            self._out.send(kernel, Failed(msg_id, str(exc)))

    def _failed(self, peer: bytes, msg_id: str, reason: str) -> None:
        self.routes.pop(msg_id)
        kernel = self.kernels.get(peer)
        if kernel is not None:
            self._out.send(kernel, Failed(msg_id, reason))

    # -- nodes -> kernels ------------------------------------------------------------------------
    def _from_node(self, node_id: str, envelope: Envelope) -> None:
        kernel_id, why = self.routes.route(envelope.parent_id, node_id, final=not isinstance(envelope.content, Event))
        if kernel_id is None:
            self.discarded += 1
            log.info("discarded a %s from node %s: %s", envelope.msg_type, node_id, why)
            return
        kernel = next((k for k in self.kernels.values() if k.kernel_id == kernel_id), None)
        if kernel is None:
            self.discarded += 1
            log.info("discarded a %s from node %s for kernel %s, which has gone", envelope.msg_type, node_id,
                     kernel_id)
            return
        frames = encode(envelope)
        bulk: BulkRef | None = None
        buffers = frames[2:]
        if kernel.lender is not None and sum(len(b) for b in buffers) >= BULK_MIN_BYTES:
            bulk = kernel.lender.place(buffers)
            if bulk is not None:
                frames = frames[:2]
        del envelope, buffers  # the node's frames: freed once copied
        self._out.send(kernel, Deliver(node_id, bulk), frames)

    def _node_changed(self, node_id: str, event: str) -> None:
        if event == RESTARTED:
            dropped = self.routes.drop_node(node_id)
            if dropped:
                log.info("node %s restarted: %d request(s) to its old process can no longer be answered",
                         node_id, len(dropped))
        rec = self.transport.directory.get(node_id)
        if rec is not None:
            for kernel in list(self.kernels.values()):
                self._out.send(kernel, Nodes([node_info(rec)]))

    def _snapshot(self) -> None:
        if self.kernels:
            nodes = Nodes([node_info(r) for r in self.transport.nodes()])
            for kernel in list(self.kernels.values()):
                self._out.send(kernel, nodes)
                for token in kernel.lender.trim() if kernel.lender is not None else []:
                    self._out.send(kernel, Unmap(token))
        for route in self.routes.sweep():
            log.info("request %s of kernel %s to node %s unanswered after %.0f s: no longer routed", route.msg_type,
                     route.kernel_id, route.node_id, self.routes.ttl)

    def _connections_closed(self, monitor: zmq.Socket[Any]) -> None:
        while True:
            try:
                event: Any = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if int(event["event"]) == zmq.EVENT_DISCONNECTED:
                fd = int(event["value"])
                for kernel in [k for k in self.kernels.values() if k.connection == fd]:
                    self._detach(kernel, "its connection closed (the kernel exited, or was restarted or killed)")

    def _unreachable(self, kernel: AttachedKernel, why: str) -> None:
        if kernel.peer in self.kernels:
            self._detach(kernel, why)

    def _detach(self, kernel: AttachedKernel, why: str, *, quiet: bool = False) -> None:
        self.kernels.pop(kernel.peer, None)
        kernel.backlog.clear()
        dropped = self.routes.drop_kernel(kernel.kernel_id)
        if not quiet or dropped:
            detail = ""
            if dropped:
                kinds = ", ".join(f"{r.msg_type} to {r.node_id}" for r in dropped[:5])
                more = ", ..." if len(dropped) > 5 else ""
                detail = f"; dropped its {len(dropped)} request(s) in flight ({kinds}{more})"
            log.info("%s detached: %s%s", kernel.describe(), why, detail)
        if kernel.borrower is not None:
            kernel.borrower.close()
        if kernel.lender is not None:
            kernel.lender.close()  # its mappings of them end with the kernel, or when it lets go of them

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> StatusReply:
        t = self.transport
        kernels = [KernelInfo(k.kernel_id, k.pid, k.researcher_id, k.attached_at, k.label,
                              self.routes.in_flight(k.kernel_id)) for k in self.kernels.values()]
        return StatusReply(os.getpid(), t.address, t.researcher_id, self.started,
                           t.key.public if t.key is not None else None, kernels,
                           [node_info(r) for r in t.nodes()], self.discarded)


def _source_fd(frame: zmq.Frame) -> int | None:
    try:
        fd = int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, ValueError, TypeError):
        return None
    return fd if fd >= 0 else None
