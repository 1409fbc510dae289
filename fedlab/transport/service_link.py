"""The local link between a researcher service and the kernels attached to it: what they say.

One zmq ``ipc://`` socket in the service's private run directory (ROUTER, in the service) and
one DEALER per kernel. Each link message is one multipart message: frame 0 is a link header, a
msgspec struct tagged by kind and encoded with msgpack; a relayed fedlab envelope follows as its
own frames (header, content, buffers), exactly as on the wire to the nodes, and is decoded with
``fedlab.protocol.decode`` (validated, never unpickled) before anything acts on it. An
envelope's large buffers do not travel through the socket (100 MB takes a loaded machine some
200 ms there): they lie in a memory file of the sender, named by a :class:`BulkRef`, and the
receiver maps that file (``fedlab.transport.service_bulk``).

Who may talk on the link: only processes that can enter the run directory (mode 0700), that is
the user who owns it (and root). On Linux the service also reads the connecting process's
credentials (``SO_PEERCRED`` on the connection a message came in on) and refuses a peer of
another uid; a kernel checks the service the same way.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

__all__ = ["BulkRef", "Bye", "Deliver", "Failed", "Hello", "KernelInfo", "LinkMessage", "NodeInfo", "Nodes",
           "Ready", "Release", "RouteInfo", "Send", "StatusQuery", "StatusReply", "StopRequest", "Unmap", "Welcome",
           "decode_link", "encode_link", "link_options", "peer_credentials"]

LINK_VERSION = 1
Buffer = bytes | memoryview
_HWM = 100_000  # messages queued per peer: link messages are small (bulk data lies in memory files)


class BulkRef(msgspec.Struct, frozen=True):
    """An envelope's buffers in the sender's memory file ``token`` (its descriptor ``fd`` there)."""

    token: str
    fd: int
    size: int  # the file's size when written: the receiver maps at least this much
    seq: int  # which write of the file: released by (token, seq)
    offsets: list[int]
    sizes: list[int]


class NodeInfo(msgspec.Struct, frozen=True):
    node_id: str
    name: str
    status: str
    last_seen: float
    first_seen: float
    heartbeat_interval: float
    session: str = ""


class RouteInfo(msgspec.Struct, frozen=True):
    msg_id: str
    msg_type: str
    node_id: str
    sent_at: float


class KernelInfo(msgspec.Struct, frozen=True):
    kernel_id: str
    pid: int
    researcher_id: str
    attached_at: float
    label: str
    in_flight: list[RouteInfo]


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """A kernel attaches. ``probe``: a memory file of the kernel, to learn whether the service can map it."""

    kernel_id: str
    pid: int
    researcher_id: str
    label: str = ""
    version: int = LINK_VERSION
    probe: BulkRef | None = None


class Welcome(msgspec.Struct, frozen=True, tag="welcome"):
    pid: int
    address: str
    researcher_id: str
    started: float
    public_key: str | None
    allowlist: str | None
    max_message_bytes: int
    heartbeat_interval: float
    nodes: list[NodeInfo]
    bulk_in: bool  # the service could map the kernel's probe: large buffers from the kernel go by file
    probe: BulkRef | None = None  # the service's own, for the kernel to try
    version: int = LINK_VERSION


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """The kernel tried the service's probe: ``bulk_out`` if it can map the service's memory files."""

    bulk_out: bool


class Send(msgspec.Struct, frozen=True, tag="send"):
    """Relay the envelope that follows to ``node_id``; report a failure to send if ``report``."""

    node_id: str
    report: bool = True
    bulk: BulkRef | None = None


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    msg_id: str
    reason: str


class Deliver(msgspec.Struct, frozen=True, tag="deliver"):
    """A node's message for this kernel (the envelope follows)."""

    node_id: str
    bulk: BulkRef | None = None


class Nodes(msgspec.Struct, frozen=True, tag="nodes"):
    """The service's view of these nodes (all of them in a periodic snapshot, one on a status change)."""

    nodes: list[NodeInfo]


class Release(msgspec.Struct, frozen=True, tag="release"):
    """The receiver is done with the buffers of (token, seq): the owner may write that file again."""

    token: str
    seq: int


class Unmap(msgspec.Struct, frozen=True, tag="unmap"):
    """The owner closed its memory file ``token``: the peer drops its mapping of it."""

    token: str


class Bye(msgspec.Struct, frozen=True, tag="bye"):
    reason: str


class StatusQuery(msgspec.Struct, frozen=True, tag="status"):
    pass


class StatusReply(msgspec.Struct, frozen=True, tag="status_reply"):
    pid: int
    address: str
    researcher_id: str
    started: float
    public_key: str | None
    kernels: list[KernelInfo]
    nodes: list[NodeInfo]
    discarded: int  # node messages for kernels that had gone, or for no request


class StopRequest(msgspec.Struct, frozen=True, tag="stop"):
    pass


LinkMessage = (Hello | Welcome | Ready | Send | Failed | Deliver | Nodes | Release | Unmap | Bye | StatusQuery
               | StatusReply | StopRequest)
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(LinkMessage)


def encode_link(message: Any, payload: Sequence[Buffer] = ()) -> list[Buffer]:
    return [_encoder.encode(message), *payload]


def decode_link(frame: Buffer) -> Any:
    """The link header in ``frame``; ``ValueError`` saying what was wrong when it is not one."""
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a fedlab link message: {exc}") from None


def link_options(sock: zmq.Socket[Any], max_message_bytes: int) -> None:
    """Both ends: no linger, a size backstop, ZMTP heartbeats (a frozen or vanished peer ends its connection)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + 1024 * 1024)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 5000)


def peer_credentials(frame: zmq.Frame) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of the local connection ``frame`` came in on, or
    None where the system cannot say (not Linux, or the connection is already gone)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        fd = int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, ValueError, TypeError):
        return None
    if fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as conn:  # our own descriptor of it: closing it closes only the dup
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid
