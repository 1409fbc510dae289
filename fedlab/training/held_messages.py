"""Wire types for a round result the node holds while the researcher pulls it in chunks.

A large model's reply does not travel whole. With ``TrainRequest.hold_min_bytes`` the researcher
asks the node to keep a result of at least that many bytes: the ``TrainReply`` then carries only
its specs (``held=True``, no frames), and the researcher pulls the frames a chunk at a time with
``ResultFetchRequest`` and folds each chunk into its running sums as it comes. Replies that finish
together therefore never sit in the researcher's memory together, whatever the number of nodes
(issue 14: researcher memory near one model). ``ResultReleaseRequest`` lets the node forget the
result; it also forgets it at the experiment's next round, or after ``HOLD_SECONDS``.

Only the researcher that asked can fetch a result, and only within its frames' bounds; the node
checks both (``fedlab.node.held_results``). Nothing here is new data: the chunks are the bytes
of the reply the node would otherwise have sent whole, released under the same rules.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from fedlab.protocol.messages import Message, register

__all__ = ["MAX_CHUNK_BYTES", "ResultChunk", "ResultFetchRequest", "ResultReleaseReply", "ResultReleaseRequest"]

MAX_CHUNK_BYTES = 16 << 20  # the largest chunk a node sends at once
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Buffer = Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]


class ResultFetchRequest(Message, frozen=True):
    """Bytes ``[offset, offset + length)`` of buffer ``buffer`` of the result the node holds for the
    train request ``request_id`` (its msg_id)."""

    request_id: Name
    buffer: Buffer
    offset: Count
    length: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_BYTES)]


class ResultChunk(Message, frozen=True):
    """The bytes asked for, as this message's one frame."""

    request_id: Name
    buffer: Buffer
    offset: Count


class ResultReleaseRequest(Message, frozen=True):
    """Forget the results held for these train requests (msg_ids)."""

    request_ids: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=64)]


class ResultReleaseReply(Message, frozen=True):
    released: Count  # how many of them the node still held


_TYPES: dict[str, type[Message]] = {
    "result_fetch_request": ResultFetchRequest,
    "result_chunk": ResultChunk,
    "result_release_request": ResultReleaseRequest,
    "result_release_reply": ResultReleaseReply,
}
for _name, _cls in _TYPES.items():
    register(_name, _cls)
