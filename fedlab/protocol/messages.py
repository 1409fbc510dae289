"""Typed message contents, one msgspec Struct per message type.

msgspec validates every field while decoding, so a handler only ever sees well-typed
content; a message that fails gets an error reply naming the field (see ``envelope``).
``MESSAGE_TYPES`` maps the wire name of each type to its Struct. Later features add their
own types by calling :func:`register`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = [
    "MESSAGE_TYPES",
    "ArraySpec",
    "Bye",
    "DatasetInfo",
    "DatasetListReply",
    "DatasetListRequest",
    "DatasetSearchReply",
    "DatasetSearchRequest",
    "ErrorReply",
    "Event",
    "Heartbeat",
    "Message",
    "PingReply",
    "PingRequest",
    "message_type_of",
    "register",
    "to_builtins",
]

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=65536)]


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every message content."""


class Event(Message, frozen=True):
    """A non-final message about a pending request (progress, say), sent with the request's id
    as its parent. A researcher routes events to the request's listener; only a reply or an
    ``ErrorReply`` ends the request."""


class ArraySpec(Message, frozen=True):
    """Describes one raw buffer frame that carries an array: which frame, its dtype and shape."""

    buffer: Annotated[int, msgspec.Meta(ge=0)]
    dtype: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]


class Heartbeat(Message, frozen=True):
    """Sent both ways every heartbeat interval.

    From a node it also introduces the node (``name``) so a researcher that just started, or
    restarted, learns of it without the node restarting. ``state`` is ``"online"`` or ``"busy"``.
    ``session`` is new in every node process: when it changes under the same node id the node
    was restarted, and whatever the old process was working on is lost (added in 1.1).
    """

    name: Name
    state: Annotated[str, msgspec.Meta(max_length=32)] = "online"
    # bounded: a NaN, tiny or infinite interval would make the peer's liveness check meaningless
    interval: Annotated[float, msgspec.Meta(ge=0.001, le=86400)] = 1.0
    session: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Bye(Message, frozen=True):
    """A peer is shutting down cleanly; the other side marks it offline at once."""

    reason: Text = ""


class PingRequest(Message, frozen=True):
    """Asks a node to answer at once. Any raw buffers are echoed back (used by the benchmark)."""

    echo_buffers: bool = True


class PingReply(Message, frozen=True):
    node_name: Name
    n_buffers: int = 0


class DatasetInfo(Message, frozen=True):
    """What a node tells about one dataset. Never its path on the node's disk."""

    dataset_id: Name
    name: Name
    tags: list[Tag]
    data_type: str
    shape: list[int]
    description: Text = ""
    columns: list[str] = []
    dtypes: dict[str, str] = {}
    n_samples: int = 0
    classes: list[str] = []
    image_shape: list[int] = []
    channels: int = 0
    derived_from: str = ""  # for a dataset made by preprocessing: the source dataset's id
    steps: list[str] = []  # and the preprocessing steps that made it, in order


class DatasetSearchRequest(Message, frozen=True):
    """Datasets carrying all of ``tags``."""

    tags: Annotated[list[Tag], msgspec.Meta(min_length=1, max_length=64)]


class DatasetSearchReply(Message, frozen=True):
    datasets: list[DatasetInfo]


class DatasetListRequest(Message, frozen=True):
    pass


class DatasetListReply(Message, frozen=True):
    datasets: list[DatasetInfo]


class ErrorReply(Message, frozen=True):
    """Any request can be answered by this: an error as data.

    ``code`` is short and machine-readable; ``message`` says what went wrong and what to do;
    ``node`` names the node that answered (empty when the researcher produced it); ``field``
    names the offending field for validation errors.
    """

    code: Name
    message: Text
    node: str = ""
    field: str | None = None


MESSAGE_TYPES: dict[str, type[Message]] = {}
_NAMES: dict[type[Message], str] = {}


def register(msg_type: str, cls: type[Message]) -> None:
    """Add a message type to the protocol (later features call this for their own types)."""
    if msg_type in MESSAGE_TYPES and MESSAGE_TYPES[msg_type] is not cls:
        raise ValueError(f"message type {msg_type!r} is already registered")
    MESSAGE_TYPES[msg_type] = cls
    _NAMES[cls] = msg_type


def message_type_of(content: Message) -> str:
    """The wire name of ``content``'s type."""
    try:
        return _NAMES[type(content)]
    except KeyError:
        raise ValueError(f"{type(content).__name__} is not a registered message type") from None


_BUILTIN: dict[str, type[Message]] = {
    "heartbeat": Heartbeat,
    "bye": Bye,
    "ping_request": PingRequest,
    "ping_reply": PingReply,
    "dataset_search_request": DatasetSearchRequest,
    "dataset_search_reply": DatasetSearchReply,
    "dataset_list_request": DatasetListRequest,
    "dataset_list_reply": DatasetListReply,
    "error_reply": ErrorReply,
}
for _name, _cls in _BUILTIN.items():
    register(_name, _cls)


def to_builtins(content: Message) -> Any:
    """Plain dict/list form of a message, for display and logging."""
    return msgspec.to_builtins(content)
