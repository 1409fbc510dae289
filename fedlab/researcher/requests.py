"""Requests: send one message to many nodes and collect exactly one outcome per node.

Every message sent gets its own msg_id, recorded in a map of pending requests; a reply is
matched by its parent msg_id, never by arrival order, so requests sent concurrently from
several threads never receive each other's replies. Each node ends a request in exactly one
of three places: ``replies()``, ``errors()`` (an error reply from the node) or ``missing()``
(no answer, and why). Waits always end: policies decide, and ``default_timeout`` bounds a
request that has no timeout policy of its own. A node that answers ``busy`` (it is already
working on as many analytics requests as its ``disclosure.max_concurrent`` allows) is asked
again after a short, growing pause, until it answers or the request's policies end the wait.

Usage (the names follow Fed-BioMed's researcher API)::

    with researcher.requests.send(DatasetSearchRequest(tags=["csv"]), policies=[DiscardOnTimeout(5)]) as req:
        for node_id, envelope in req.replies().items(): ...
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedlab.protocol import Envelope, ErrorReply, Event, Message, encode_content, make_envelope, new_msg_id
from fedlab.researcher.policies import (
    ERROR,
    MISSING,
    PENDING,
    REPLIED,
    DiscardOnTimeout,
    NodeProgress,
    RequestPolicy,
)
from fedlab.transport.directory import OFFLINE, RESTARTED, NodeDirectory, NodeRecord

__all__ = ["FederatedRequest", "MessagesByNode", "MissingNode", "Requests"]

log = logging.getLogger("fedlab.researcher")
BUSY = "busy"
_RETRY_FIRST_S, _RETRY_MAX_S = 0.02, 0.5
Buffers = Sequence[bytes | memoryview]
EventListener = Callable[[str, Envelope], None]


class ResearcherTransport(Protocol):
    researcher_id: str
    directory: NodeDirectory

    def send(self, node_id: str, envelope: Envelope, *, content_frame: bytes | None = None,
             on_failure: Any = None) -> None: ...

    def nodes(self) -> list[NodeRecord]: ...


class MessagesByNode(dict[str, Message | tuple[Message, Buffers]]):
    """A different message for each node: ``{node_id: message}`` or ``{node_id: (message, buffers)}``."""


@dataclass(frozen=True)
class MissingNode:
    """A node that gave no answer: ``reason`` is timeout, disconnected, restarted, stopped or unknown."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class FederatedRequest:
    """One message sent to several nodes; a context manager that waits for the outcome on entry."""

    def __init__(self, requests: Requests, node_ids: list[str], policies: list[RequestPolicy],
                 default_timeout: float, on_event: EventListener | None = None) -> None:
        self._requests = requests
        self._on_event = on_event
        self._yielded: set[str] = set()
        self._cond = threading.Condition()
        self._progress = {n: NodeProgress() for n in node_ids}
        self._replies: dict[str, Envelope] = {}
        self._errors: dict[str, ErrorReply] = {}
        self._policies = list(policies)
        if not any(p.bounds_wait for p in self._policies):
            self._policies.append(DiscardOnTimeout(default_timeout))
        self.msg_ids: dict[str, str] = {}
        self.started = time.monotonic()
        self.elapsed: float | None = None
        self.stopped_by: RequestPolicy | None = None
        self._done = False
        self._busy_retries: dict[str, int] = {}
        self._sent: dict[str, tuple[Message, Buffers, bytes | None]] = {}  # what to send again after busy

    # -- called from the transport thread ------------------------------------------------------
    def _deliver(self, node_id: str, envelope: Envelope) -> None:
        with self._cond:
            progress = self._progress[node_id]
            if progress.status != PENDING:
                log.info("late reply from %s ignored (%s)", node_id, progress.reason or progress.status)
                return
            if isinstance(envelope.content, ErrorReply) and envelope.content.code == BUSY and not self._done:
                attempt = self._busy_retries.get(node_id, 0)
                self._busy_retries[node_id] = attempt + 1
                pause = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2**attempt)
                timer = threading.Timer(pause, self._requests._resend, args=(self, node_id))
                timer.daemon = True
                timer.start()
                return
            progress.answered_at = time.monotonic()
            if isinstance(envelope.content, ErrorReply):
                progress.status = ERROR
                self._errors[node_id] = envelope.content
            else:
                progress.status = REPLIED
                self._replies[node_id] = envelope
            self._cond.notify_all()

    def _event(self, node_id: str, envelope: Envelope) -> None:
        """A progress event for this request: hand it to the listener, never end the request."""
        with self._cond:
            if self._progress[node_id].status != PENDING or self._on_event is None:
                return
        try:
            self._on_event(node_id, envelope)
        except Exception:  # a broken listener must not take the io thread down
            log.exception("event listener failed on a %s from %s", envelope.msg_type, node_id)

    def _node_status(self, node_id: str, status: str) -> None:
        with self._cond:
            progress = self._progress.get(node_id)
            if progress is None or progress.status != PENDING:
                return
            if status == RESTARTED:  # a new process under the same id: it never got this request
                progress.status, progress.reason = MISSING, "restarted"
                progress.detail = "the node restarted while the request was pending; its new process never got it"
                log.warning("node %s restarted while a request was pending: left out of it", node_id)
            else:
                progress.offline_since = time.monotonic() if status == OFFLINE else None
            self._cond.notify_all()

    def _mark_missing(self, node_id: str, reason: str, detail: str) -> None:
        with self._cond:
            progress = self._progress[node_id]
            if progress.status == PENDING:
                progress.status, progress.reason, progress.detail = MISSING, reason, detail
                self._cond.notify_all()

    # -- waiting -----------------------------------------------------------------------------
    def _apply_policies(self, now: float) -> None:
        if not any(p.handles_disconnect for p in self._policies):
            for p in self._progress.values():  # no StopOnDisconnect: drop vanished nodes
                if p.status == PENDING and p.offline_since is not None:
                    p.status, p.reason = MISSING, "disconnected"
                    p.detail = "the node went offline while the request was pending"
        for policy in self._policies:
            verdict = policy.check(self.started, now, self._progress)
            if verdict is None:
                continue
            for node_id, (reason, detail) in verdict.nodes.items():
                p = self._progress[node_id]
                if p.status == PENDING:
                    p.status, p.reason, p.detail = MISSING, reason, detail
            if verdict.stop:
                self.stopped_by = policy
                for p in self._progress.values():
                    if p.status == PENDING:
                        p.status, p.reason = MISSING, "stopped"
                        p.detail = f"request stopped by {policy!r}"
                return

    def wait(self) -> FederatedRequest:
        """Block until every node has an outcome. Always returns: policies bound the wait."""
        with self._cond:
            while not self._done:
                now = time.monotonic()
                self._apply_policies(now)
                if all(p.status != PENDING for p in self._progress.values()):
                    self._done = True
                    self.elapsed = now - self.started
                    break
                deadlines = [d for p in self._policies
                             if (d := p.deadline(self.started, self._progress)) is not None]
                timeout = max(0.0, min(deadlines) - now) if deadlines else 0.05
                self._cond.wait(timeout=min(timeout, 0.5) + 0.0005)
        self._requests._forget(self)
        return self

    def as_completed(self) -> Iterator[tuple[str, Envelope]]:
        """Yield ``(node_id, reply)`` as each reply arrives, until every node has an outcome.

        The request drops its own reference to each reply once yielded, so a caller that
        reduces replies as they come (a running weighted sum of model parameters) holds one
        reply at a time, not all of them. Error replies and missing nodes are not yielded:
        read them from ``errors()`` and ``missing()`` afterwards.
        """
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if not self._done:
                        self._apply_policies(now)
                    ready = [n for n in self._replies if n not in self._yielded]
                    finished = all(p.status != PENDING for p in self._progress.values())
                    if ready or finished:
                        break
                    deadlines = [d for p in self._policies
                                 if (d := p.deadline(self.started, self._progress)) is not None]
                    timeout = max(0.0, min(deadlines) - now) if deadlines else 0.05
                    self._cond.wait(timeout=min(timeout, 0.5) + 0.0005)
                if ready:
                    node_id = ready[0]
                    self._yielded.add(node_id)
                    envelope = self._replies.pop(node_id)
            if ready:
                yield node_id, envelope
                del envelope  # the caller has folded it in: do not hold it until the next one arrives
                continue
            self.wait()
            return

    def __enter__(self) -> FederatedRequest:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self._requests._forget(self)

    # -- results -----------------------------------------------------------------------------
    def replies(self) -> dict[str, Envelope]:
        """Replies by node (less those already taken by ``as_completed``)."""
        self.wait()
        return dict(self._replies)

    def errors(self) -> dict[str, ErrorReply]:
        self.wait()
        return dict(self._errors)

    def missing(self) -> dict[str, MissingNode]:
        self.wait()
        return {n: MissingNode(p.reason, p.detail) for n, p in self._progress.items() if p.status == MISSING}

    def reply_times(self) -> dict[str, float]:
        """When each node's reply or error arrived (monotonic clock, like ``started``)."""
        self.wait()
        return {n: p.answered_at for n, p in self._progress.items() if p.answered_at is not None}

    @property
    def node_ids(self) -> list[str]:
        return list(self._progress)

    @property
    def stopped(self) -> bool:
        self.wait()
        return self.stopped_by is not None


class Requests:
    """Sends messages and routes replies to the request that is waiting for them."""

    def __init__(self, transport: ResearcherTransport, *, default_timeout: float = 60.0) -> None:
        self._transport = transport
        self.default_timeout = default_timeout
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[FederatedRequest, str]] = {}
        transport.directory.add_listener(self._on_status)

    @property
    def researcher_id(self) -> str:
        return self._transport.researcher_id

    def send(
        self,
        message: Message | MessagesByNode,
        nodes: Iterable[str] | None = None,
        policies: Sequence[RequestPolicy] | None = None,
        *,
        buffers: Buffers = (),
        on_event: EventListener | None = None,
    ) -> FederatedRequest:
        """Send ``message`` (or one message per node) and return the request to wait on.

        ``on_event(node_id, envelope)`` is called, on the io thread, for each ``Event`` (progress)
        a node sends about this request while it is pending; keep it quick.
        """
        if isinstance(message, Mapping):
            node_ids = list(nodes) if nodes is not None else list(message)
            absent = [n for n in node_ids if n not in message]
            if absent:
                raise ValueError(f"MessagesByNode has no message for nodes {absent}")
        else:
            node_ids = list(nodes) if nodes is not None else [
                r.node_id for r in self._transport.nodes() if r.status != OFFLINE]
        node_ids = list(dict.fromkeys(node_ids))
        request = FederatedRequest(self, node_ids, list(policies or []), self.default_timeout, on_event)
        shared_frame = None if isinstance(message, Mapping) else encode_content(message)
        for node_id in node_ids:
            record = self._transport.directory.get(node_id)
            if record is None:
                request._mark_missing(node_id, "unknown", "no node with this id has connected")
                continue
            if record.status == OFFLINE:
                request._mark_missing(node_id, "disconnected", "the node was offline when the request was sent")
                continue
            if isinstance(message, Mapping):
                item = message[node_id]
                content, node_buffers = item if isinstance(item, tuple) else (item, ())
                frame = None
            else:
                content, node_buffers, frame = message, buffers, shared_frame
            request._sent[node_id] = (content, node_buffers, frame)
            self._send_one(request, node_id)
        return request

    def _send_one(self, request: FederatedRequest, node_id: str) -> None:
        content, node_buffers, frame = request._sent[node_id]
        msg_id = new_msg_id()
        with self._lock:
            old = request.msg_ids.get(node_id)
            if old is not None:
                self._pending.pop(old, None)
            request.msg_ids[node_id] = msg_id
            self._pending[msg_id] = (request, node_id)
        envelope = make_envelope(content, self.researcher_id, buffers=node_buffers, msg_id=msg_id)
        self._transport.send(node_id, envelope, content_frame=frame,
                             on_failure=lambda reason, n=node_id: request._mark_missing(
                                 n, "disconnected", f"could not send: {reason}"))

    def _resend(self, request: FederatedRequest, node_id: str) -> None:
        """Ask a node that answered ``busy`` again (from a timer thread), unless the request ended."""
        with request._cond:
            if request._done or request._progress[node_id].status != PENDING:
                return
        try:
            self._send_one(request, node_id)
        except Exception:  # a failed resend must not kill the timer thread silently
            log.exception("could not ask %s again after it was busy", node_id)
            request._mark_missing(node_id, "disconnected", "could not resend after a busy reply")

    # -- transport callbacks (io thread) -------------------------------------------------------
    def on_message(self, node_id: str, envelope: Envelope) -> None:
        parent = envelope.parent_id
        with self._lock:
            entry = self._pending.get(parent) if parent else None
        if entry is None:
            log.info("a %s from %s answers no pending request (parent %s); ignored",
                     envelope.msg_type, node_id, parent)
            return
        request, expected_node = entry
        if expected_node != node_id:
            log.warning("%s answered a request sent to %s; ignored", node_id, expected_node)
            return
        if isinstance(envelope.content, Event):
            request._event(node_id, envelope)
        else:
            request._deliver(node_id, envelope)

    def _on_status(self, node_id: str, status: str) -> None:
        with self._lock:
            requests = {req for req, n in self._pending.values() if n == node_id}
        for request in requests:
            request._node_status(node_id, status)

    def _forget(self, request: FederatedRequest) -> None:
        with self._lock:
            for msg_id in request.msg_ids.values():
                self._pending.pop(msg_id, None)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)
