"""Pulling a node's held round result in chunks, and folding it into the aggregator as it comes.

A node asked with ``TrainRequest.hold_min_bytes`` keeps a large result and answers only its specs
(``TrainReply.held``). ``ResultPuller.chunks`` then asks for it a chunk at a time, with a few
chunks in flight so the wire stays busy, and yields each chunk as a flat read-only array that the
aggregator adds into its running sums (``Aggregator.add_streamed``) before the next one is taken.
The experiment pulls two nodes at a time, so the researcher holds the global model, the sums and a
few chunks, whatever the number of nodes: replies that finish together wait on their nodes.

A node that dies, times out or answers wrongly while it is being pulled ends as a ``ResultLost``
(named in the round's history, like a node that died mid-round). The sums then hold part of its
update; ``PulledRound`` starts the round's sums again and pulls the nodes already added once more
(they still hold their results), so the global model never includes part of a node.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fedlab.errors import FedlabError
from fedlab.protocol.arrays import ALLOWED_DTYPES
from fedlab.researcher.memory_tuning import tune_for_large_buffers
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import FederatedRequest, MessagesByNode, Requests
from fedlab.training.held_messages import ResultChunk, ResultFetchRequest, ResultReleaseReply, ResultReleaseRequest
from fedlab.training.messages import TrainReply

__all__ = ["CHUNK_BYTES", "HOLD_MIN_BYTES", "PULLS", "WINDOW", "HeldResult", "PulledRound", "ResultLost",
           "ResultPuller"]

log = logging.getLogger("fedlab.researcher")
HOLD_MIN_BYTES = 16 << 20  # replies from this size up are held by the node and pulled
CHUNK_BYTES = 8 << 20  # bytes per chunk asked for
WINDOW = 4  # chunks in flight from each node being pulled
PULLS = 2  # nodes pulled at once (each connection is decrypted, or copied, on its own thread)
FETCH_TIMEOUT = 60.0  # seconds one chunk may take
RELEASE_TIMEOUT = 5.0


class ResultLost(FedlabError):
    """A held result could not be pulled whole: ``reason`` is ``"disconnected"``, ``"timeout"`` or an
    error code, as for a node missing from a round."""

    def __init__(self, node_id: str, reason: str, detail: str) -> None:
        super().__init__(f"node {node_id}'s update was lost while it was being received ({reason}): {detail}")
        self.node_id, self.reason, self.detail = node_id, reason, detail


@dataclass(frozen=True)
class HeldResult:
    """A node's round result that the node holds: ``request_id`` is the train request's msg_id."""

    node_id: str
    request_id: str
    reply: TrainReply

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{name: (shape, dtype)}`` of the parameters, as the reply announced them (checked dtypes)."""
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for named in self.reply.params:
            if named.name in out or named.array.dtype not in ALLOWED_DTYPES:
                raise ResultLost(self.node_id, "unexpected_reply",
                                 f"its reply announced {named.name!r} twice or with dtype {named.array.dtype!r}")
            out[named.name] = (tuple(named.array.shape), np.dtype(named.array.dtype))
        return out


class ResultPuller:
    """Pulls held results from nodes through ``requests``, a window of chunks at a time."""

    def __init__(self, requests: Requests, *, chunk_bytes: int = CHUNK_BYTES, window: int = WINDOW,
                 timeout: float = FETCH_TIMEOUT) -> None:
        if chunk_bytes <= 0 or window <= 0:
            raise ValueError("chunk_bytes and window must be > 0")
        self.requests, self.chunk_bytes, self.window, self.timeout = requests, chunk_bytes, window, timeout

    def chunks(self, held: HeldResult) -> Iterator[tuple[str, int, np.ndarray]]:
        """``(name, first_element, flat values)`` for every chunk of ``held``'s parameters, in order.
        Raises ``ResultLost`` when one does not come back right; the chunks in flight are dropped."""
        plan = list(self._plan(held))
        flight: deque[tuple[FederatedRequest, str, int, int, int, int, np.dtype]] = deque()
        position = 0
        try:
            while position < len(plan) or flight:
                while position < len(plan) and len(flight) < self.window:
                    name, buffer, offset, length, start, dtype = plan[position]
                    request = self.requests.send(
                        ResultFetchRequest(request_id=held.request_id, buffer=buffer, offset=offset, length=length),
                        [held.node_id], [DiscardOnTimeout(self.timeout)])
                    flight.append((request, name, buffer, offset, length, start, dtype))
                    position += 1
                request, name, buffer, offset, length, start, dtype = flight.popleft()
                frame = self._take(held, request, buffer, offset, length)
                yield name, start, np.frombuffer(frame, dtype)
                del frame
        finally:
            for request, *_ in flight:  # stopped early (a loss, or the caller gave up): forget the rest
                request.__exit__(None, None, None)

    def _plan(self, held: HeldResult) -> Iterator[tuple[str, int, int, int, int, np.dtype]]:
        """``(name, buffer, byte offset, length, first element, dtype)`` per chunk, element-aligned."""
        for named in held.reply.params:
            dtype = np.dtype(named.array.dtype)
            nbytes = math.prod(named.array.shape) * dtype.itemsize
            step = max(dtype.itemsize, self.chunk_bytes // dtype.itemsize * dtype.itemsize)
            for offset in range(0, nbytes, step):
                length = min(step, nbytes - offset)
                yield named.name, named.array.buffer, offset, length, offset // dtype.itemsize, dtype

    def _take(self, held: HeldResult, request: FederatedRequest, buffer: int, offset: int,
              length: int) -> memoryview:
        request.wait()
        node = held.node_id
        missing = request.missing().get(node)
        if missing is not None:
            raise ResultLost(node, missing.reason, missing.detail)
        error = request.errors().get(node)
        if error is not None:
            raise ResultLost(node, error.code, error.message)
        envelope = request.replies()[node]
        chunk = envelope.content
        if (not isinstance(chunk, ResultChunk) or chunk.request_id != held.request_id or chunk.buffer != buffer
                or chunk.offset != offset or len(envelope.buffers) != 1
                or memoryview(envelope.buffers[0]).nbytes != length):
            raise ResultLost(node, "unexpected_reply", f"it answered bytes {offset}..{offset + length} of buffer "
                                                       f"{buffer} with a {envelope.msg_type} that does not match")
        return memoryview(envelope.buffers[0]).cast("B")

    def release(self, helds: list[HeldResult]) -> None:
        """Tell the nodes to forget these results (they also do at the next round); waits briefly."""
        by_node: dict[str, list[str]] = {}
        for held in helds:
            by_node.setdefault(held.node_id, []).append(held.request_id)
        if not by_node:
            return
        messages = MessagesByNode({n: ResultReleaseRequest(request_ids=ids[-64:]) for n, ids in by_node.items()})
        with self.requests.send(messages, list(by_node), [DiscardOnTimeout(RELEASE_TIMEOUT)]) as request:
            for node_id, envelope in request.replies().items():
                if not isinstance(envelope.content, ResultReleaseReply):
                    log.info("node %s answered the release of its held result with a %s", node_id,
                             envelope.msg_type)


class PulledRound:
    """One round's folding when nodes hold large results: ``fold`` is the job's ``on_reply``, ``finish``
    waits for the pulls, releases what the nodes hold and names the nodes lost while being pulled.

    Up to ``PULLS`` nodes are pulled at once, each on its own thread: the sums start at zero and
    each chunk is added under the lock of its place (the same for every node), so nodes that are
    decrypted or copied in parallel never add into the same elements at once. A whole reply (a node
    of an older fedlab, or one below ``HOLD_MIN_BYTES``) is added the same way, and cannot be pulled
    again: if the sums must start again after a loss, such a node is named as left out of the round
    rather than folded in part."""

    def __init__(self, aggregator: object, requests: Requests, global_params: Mapping[str, np.ndarray],
                 puller: ResultPuller | None = None, pulls: int | None = None) -> None:
        from fedlab.researcher.aggregators import Aggregator

        assert isinstance(aggregator, Aggregator)
        self.aggregator = aggregator
        # read now, not at import: tests lower them
        self.puller = puller or ResultPuller(requests, chunk_bytes=CHUNK_BYTES, window=WINDOW)
        self.global_params = global_params
        self.added: list[HeldResult] = []  # pulled whole into the sums
        self.seen: list[HeldResult] = []  # every held result, to release
        self.lost: dict[str, ResultLost] = {}
        self.whole: list[str] = []
        self._dirty = False  # a lost node had chunks in the sums
        self._book = threading.Lock()
        self._places: dict[tuple[str, int], threading.Lock] = {}
        self._pool = ThreadPoolExecutor(max_workers=pulls or PULLS, thread_name_prefix="fedlab-pull")
        self._futures: list[Future[None]] = []
        self.aggregator.zero_sums()
        tune_for_large_buffers()  # freed chunks go back to the system, not into per-thread arenas

    def fold(self, result: object) -> None:
        from fedlab.researcher.training_jobs import TrainResult

        assert isinstance(result, TrainResult)
        node_id, n_samples = result.node_id, result.reply.n_samples
        if result.held is None:  # a whole reply: its arrays, chunked like a pull, added now
            params = {k: np.asarray(v) for k, v in result.params.items()}
            layout = {name: (value.shape, value.dtype) for name, value in params.items()}
            chunks = self._locked(_whole_chunks(params))
            try:
                self.aggregator.add_streamed(node_id, layout, n_samples, chunks, lock=self._book)
            finally:
                chunks.close()
            self.whole.append(node_id)
            return
        held = result.held
        self.aggregator.check_layout(node_id, held.layout())  # a wrong reply is refused now, as a whole one
        with self._book:
            self.seen.append(held)
        self._futures.append(self._pool.submit(self._pull, held))

    def _pull(self, held: HeldResult) -> None:
        folded = 0

        def counted() -> Iterator[tuple[str, int, np.ndarray]]:
            nonlocal folded
            for chunk in self.puller.chunks(held):
                yield chunk
                folded += 1  # the aggregator took it before asking for the next

        chunks = self._locked(counted())
        try:
            self.aggregator.add_streamed(held.node_id, held.layout(), held.reply.n_samples, chunks, lock=self._book)
        except FedlabError as exc:
            lost = exc if isinstance(exc, ResultLost) else ResultLost(held.node_id, "unexpected_reply", str(exc))
            with self._book:
                self.lost[held.node_id] = lost
                self._dirty = self._dirty or folded > 0
            return
        finally:
            chunks.close()  # now, not when the exception is collected: its place's lock is let go
        with self._book:
            self.added.append(held)

    def _locked(self, chunks: Iterator[tuple[str, int, np.ndarray]]) -> Generator[tuple[str, int, np.ndarray]]:
        """``chunks``, each held under the lock of its place while the aggregator adds it."""
        for name, start, values in chunks:
            with self._book:
                place = self._places.setdefault((name, start), threading.Lock())
            with place:
                yield name, start, values

    def finish(self, results: dict[str, object]) -> None:
        """Wait for the pulls; fold again without the lost nodes if part of one is in the sums; release the
        held results; mark in ``results`` (node id -> ``NodeRound``) the nodes left out."""
        from fedlab.researcher.training_jobs import NodeRound

        try:
            self._wait()
            while self._dirty:  # part of a lost node is in the sums: start them again with the others
                log.warning("folding this round's updates again without %s (%d nodes)", sorted(self.lost),
                            len(self.added))
                again, self.added, self._dirty = self.added, [], False
                self.aggregator.begin_round(self.global_params)
                self.aggregator.zero_sums()
                self._futures = [self._pool.submit(self._pull, held) for held in again]
                self._wait()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            try:
                self.puller.release(self.seen)
            except FedlabError as failure:  # the nodes forget them at the next round anyway
                log.warning("could not release the nodes' held results: %s", failure)
        for node_id, lost in self.lost.items():
            log.warning("node %s left out of the round: %s", node_id, lost)
            results[node_id] = NodeRound(node_id, "missing", reason=f"{lost.reason}: {lost.detail}")
        for node_id in self.whole:
            if node_id not in self.aggregator.added and node_id not in self.lost:
                results[node_id] = NodeRound(
                    node_id, "missing", reason="refolded: another node's update was lost while it was being "
                                               "received, and this node's whole reply could not be folded again")

    def _wait(self) -> None:
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()  # each chunk's wait has its deadline (FETCH_TIMEOUT); a bug is raised here


def _whole_chunks(params: Mapping[str, np.ndarray]) -> Iterator[tuple[str, int, np.ndarray]]:
    """A whole reply's arrays in the places a pull of ``CHUNK_BYTES`` would give them."""
    for name, value in params.items():
        flat = value.reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, value.dtype.itemsize))
        for start in range(0, flat.size, step):
            yield name, start, flat[start:start + step]
