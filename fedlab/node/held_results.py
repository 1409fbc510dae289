"""Round results the node keeps while the researcher pulls them in chunks (``held_messages``).

A held result is the reply's frames, views of the node's memory file the round ran in (no copy):
holding it keeps that file busy, so the worker writes the next round into its other file. That
is why a result is forgotten as soon as it is not needed: when the researcher releases it, when
the same researcher starts the experiment's next round, or after ``HOLD_SECONDS``; and why at most
``MAX_HELD`` are kept (the oldest goes first, with a log line).

Only the researcher that asked for the round can fetch it (``sender``, which on a CURVE node is
the authenticated researcher's id), and only bytes inside its frames: anything else is refused
with an error that says why, and nothing is sent that the whole reply would not have carried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fedlab.errors import FedlabProtocolError
from fedlab.protocol import Envelope
from fedlab.training.held_messages import ResultChunk, ResultFetchRequest, ResultReleaseReply, ResultReleaseRequest

__all__ = ["HOLD_SECONDS", "MAX_HELD", "HeldResults"]

log = logging.getLogger("fedlab.node")
HOLD_SECONDS = 600.0  # a result nobody fetched or released is forgotten after this long
MAX_HELD = 4  # results kept at once (each keeps one memory file busy)


@dataclass
class _Held:
    sender: str
    experiment_id: str
    frames: list[memoryview]
    expires: float


class HeldResults:
    """The held results of this node, by train request msg_id; thread-safe."""

    def __init__(self, *, node_name: str, hold_seconds: float = HOLD_SECONDS, max_held: int = MAX_HELD) -> None:
        self.node_name = node_name
        self.hold_seconds = hold_seconds
        self.max_held = max_held
        self._lock = threading.Lock()
        self._held: OrderedDict[str, _Held] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._held)

    def hold(self, request_id: str, sender: str, experiment_id: str,
             frames: Sequence[bytes | memoryview]) -> None:
        """Keep ``frames`` (the reply's, in order) for ``request_id`` until released or expired."""
        views = [memoryview(f).cast("B") if not isinstance(f, memoryview) or f.format != "B" or f.ndim != 1
                 else f for f in frames]
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            while len(self._held) >= self.max_held:
                old_id, old = self._held.popitem(last=False)
                log.warning("held result of request %s (experiment %s) forgotten unfetched: %d are held at most",
                            old_id, old.experiment_id, self.max_held)
            self._held[request_id] = _Held(sender, experiment_id, views, now + self.hold_seconds)

    def new_round(self, sender: str, experiment_id: str) -> None:
        """The researcher starts another round of ``experiment_id``: its earlier results are not needed."""
        with self._lock:
            for request_id in [r for r, h in self._held.items()
                               if h.sender == sender and h.experiment_id == experiment_id]:
                del self._held[request_id]

    def fetch(self, envelope: Envelope) -> tuple[ResultChunk, list[memoryview]]:
        request = envelope.content
        assert isinstance(request, ResultFetchRequest)
        with self._lock:
            self._expire(time.monotonic())
            held = self._held.get(request.request_id)
        if held is None or held.sender != envelope.sender:  # another researcher's result is not there for it
            raise FedlabProtocolError(
                f"node {self.node_name} holds no result of request {request.request_id} for you: it was released, "
                f"it expired ({self.hold_seconds:g} s after the round), or the node restarted; run the round again",
                code="unknown_result")
        if request.buffer >= len(held.frames):
            raise FedlabProtocolError(f"the result of request {request.request_id} has {len(held.frames)} buffers, "
                                      f"not buffer {request.buffer}", code="invalid_request")
        frame = held.frames[request.buffer]
        if request.offset + request.length > frame.nbytes:
            raise FedlabProtocolError(
                f"bytes {request.offset}..{request.offset + request.length} are outside buffer {request.buffer} "
                f"of the result of request {request.request_id} ({frame.nbytes} bytes)", code="invalid_request")
        chunk = ResultChunk(request_id=request.request_id, buffer=request.buffer, offset=request.offset)
        return chunk, [frame[request.offset:request.offset + request.length]]

    def release(self, envelope: Envelope) -> ResultReleaseReply:
        request = envelope.content
        assert isinstance(request, ResultReleaseRequest)
        released = 0
        with self._lock:
            for request_id in request.request_ids:
                held = self._held.get(request_id)
                if held is not None and held.sender == envelope.sender:
                    del self._held[request_id]
                    released += 1
        return ResultReleaseReply(released=released)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()

    def _expire(self, now: float) -> None:
        for request_id in [r for r, h in self._held.items() if h.expires <= now]:
            log.info("held result of request %s expired unfetched", request_id)
            del self._held[request_id]
