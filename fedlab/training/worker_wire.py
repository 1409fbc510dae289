"""What a node and its training worker process say to each other, and how it travels.

The node runs training plans in a separate process (``fedlab.training.worker``) so that a
plan that hangs can be killed and a plan never shares the node's memory. The two talk over
one end each of a Unix socket pair. Nothing is pickled, not even between these two local
processes: a message is a msgpack header (one of the structs below, tagged by type) followed
by raw buffer frames, the same layout as on the network (``NamedArray`` specs index the
frames). The header is preceded by its length (8 bytes, little endian).

Small frames (under 64 kB in all) follow the header on the socket, each with its length, in
one write. Larger ones (a model's parameters) go through shared memory instead: the sender
copies them once into an anonymous memory file (``memfd``) and passes its file descriptor
with the header (``SCM_RIGHTS``); the receiver maps it and reads the frames in place. Pushing
even 0.4 MB through a socket's buffer (a few hundred kB) costs two copies and hand-overs
between the two processes, each waiting for the other to be scheduled (milliseconds each on a
loaded machine); the memory file costs one copy and no hand-over, and the kernel frees it when
both ends have let go (even if one dies). The receiver keeps its mapping of the sender's file
between messages (``SharedMapping``): mapping 100 MB afresh costs tens of milliseconds.
Each side reuses one memory file (``SharedArena``), kept mapped, for the frames it sends:
filling fresh pages of a memory file costs the kernel several times the copy itself. That is
safe because the two take turns (a round, then its reply) and each receiver is done with a
message's frames before it sends the next message: the worker has loaded the parameters into
its model, and the node copies a result's frames out (into ordinary memory, cheap to
allocate) at once, since it hands them to the network without knowing when they are sent.

This module imports neither torch nor anything of the node.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from fedlab.training.messages import NamedArray

__all__ = [
    "Cancel",
    "Failed",
    "Ready",
    "RoundDone",
    "RoundProgress",
    "RunRound",
    "SharedArena",
    "SharedMapping",
    "WorkerMessage",
    "recv_message",
    "send_message",
]

_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 64 << 20  # a header is a few kB (a plan's source at most 1 MiB); more is a broken peer
_SHARED_FROM = 64 << 10  # frames of this many bytes in all go through a shared memory file
_SHARED = hasattr(os, "memfd_create")  # Linux; elsewhere every frame goes through the socket
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Base(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    n_buffers: int = 0
    shared: list[int] | None = None  # frame sizes, when the frames are in the shared memory file sent along


class RunRound(_Base, tag="run_round"):
    """Node -> worker: one round. ``params``/``aux_vars`` index the frames that follow; ``state`` is
    what the previous round asked to keep (``fedlab.training.state`` bytes), read from the node's database."""

    job_id: str = ""
    plan_id: str = ""
    plan_source: str = ""
    plan_class: str = ""
    dataset_id: str = ""
    data_type: str = ""
    data_path: str = ""
    round: int = 0
    model_args: dict[str, Any] = {}
    training_args: dict[str, Any] = {}
    aggregator_args: dict[str, Any] = {}
    params: list[NamedArray] = []
    aux_vars: dict[str, list[NamedArray]] = {}
    state: bytes | None = None
    do_training: bool = True
    share_persistent_buffers: bool = True


class Cancel(_Base, tag="cancel"):
    """Node -> worker: stop round ``job_id`` at its next iteration (ignored once that round is over)."""

    job_id: str = ""


class Ready(_Base, tag="ready"):
    """Worker -> node, once: torch is loaded and warm; the plan import guard is in place."""

    torch_version: str = ""
    threads: int = 0
    seconds: float = 0.0


class RoundProgress(_Base, tag="progress"):
    job_id: str = ""
    phase: str = ""
    epoch: int = 0
    n_epochs: int = 0
    iteration: int = 0
    n_iterations: int = 0
    loss: float | None = None


class RoundDone(_Base, tag="done"):
    """Worker -> node: the round's result; ``params`` and ``aux_vars`` index the frames that follow.
    ``loaded`` names what had to be (re)loaded for this round (``"plan"``, ``"dataset"``)."""

    job_id: str = ""
    params: list[NamedArray] = []
    aux_vars: dict[str, list[NamedArray]] = {}
    n_samples: int = 0
    n_test_samples: int = 0
    n_updates: int = 0
    train_loss: float | None = None
    metrics_before: dict[str, float] = {}
    metrics_after: dict[str, float] = {}
    state: bytes | None = None
    compute_seconds: float = 0.0
    loaded: list[str] = []


class Failed(_Base, tag="failed"):
    """Worker -> node: the round failed. ``error`` is the ``fedlab.errors`` class name, ``code`` a
    protocol error's code; ``message`` is written for the researcher."""

    job_id: str = ""
    error: str = "FedlabTrainingError"
    code: str = ""
    message: str = ""


WorkerMessage = RunRound | Cancel | Ready | RoundProgress | RoundDone | Failed
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WorkerMessage)


class SharedArena:
    """One memory file, kept mapped, reused for the large frames of successive messages; grown as needed.

    Only for a sender whose receiver is done with (or has copied) a message's frames before the
    sender writes its next message, as the node and its worker are (see the module's docstring).
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._map: mmap.mmap | None = None

    def write(self, views: Sequence[memoryview], total: int) -> int:
        """Put ``views`` back to back at the start of the file; its descriptor (still the arena's)."""
        if self._fd is None:
            self._fd = os.memfd_create("fedlab-frames", os.MFD_CLOEXEC)
        if self._map is None or len(self._map) < total:
            if self._map is not None:
                self._map.close()
            os.ftruncate(self._fd, total)
            self._map = mmap.mmap(self._fd, total)
        offset = 0
        for view in views:
            self._map[offset:offset + view.nbytes] = view
            offset += view.nbytes
        return self._fd

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SharedMapping:
    """The receiving side's mapping of the peer's memory file, kept between messages.

    The peer sends the same file (its ``SharedArena``) with every large message, as a new
    descriptor each time. Mapping 100 MB again costs the kernel tens of milliseconds every
    message (the page tables filled anew), so the mapping is kept and reused while the file
    is the same one (same device and inode) and the frames fit in it. The inode cannot be
    reused by another file meanwhile: the kept mapping keeps the file alive. The frames
    returned are valid until the peer writes its next message (the same rule as the arena's).
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def frames(self, fd: int, sizes: list[int]) -> list[memoryview]:
        """The frames in the memory file ``fd`` (back to back), as views of the kept mapping."""
        total = sum(sizes)
        stat = os.fstat(fd)
        if total == 0 or stat.st_size < total:
            raise EOFError("a worker message's memory file is smaller than its frames")
        key = (stat.st_dev, stat.st_ino)
        if self._view is None or key != self._key or len(self._view) < total:
            self.close()
            self._map = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED | _POPULATE)  # one fault-in, not one per page
            self._view = memoryview(self._map)
            self._key = key
        frames, offset = [], 0
        for size in sizes:
            frames.append(self._view[offset:offset + size])
            offset += size
        return frames

    def close(self) -> None:
        """Let go of the mapping (it ends when the last frame handed out is gone, too)."""
        view, mapped = self._view, self._map
        self._view = self._map = None
        self._key = None
        try:  # frames still held elsewhere keep the mapping alive until they go
            if view is not None:
                view.release()
            if mapped is not None:
                mapped.close()
        except BufferError:
            pass


def send_message(sock: socket.socket, message: WorkerMessage, buffers: Sequence[bytes | memoryview] = (),
                 arena: SharedArena | None = None) -> None:
    """Write ``message`` and its frames; ``message.n_buffers`` must equal ``len(buffers)``. Large frames
    go in ``arena`` when given (see ``SharedArena`` for when that is safe), else in a fresh memory file."""
    if message.n_buffers != len(buffers):
        raise ValueError(f"message announces {message.n_buffers} buffers, {len(buffers)} given")
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    total = sum(view.nbytes for view in views)
    if _SHARED and total >= _SHARED_FROM:
        message.shared = [view.nbytes for view in views]
        header = _encoder.encode(message)
        fd = arena.write(views, total) if arena is not None else _shared_file(views, total)
        try:
            socket.send_fds(sock, [_LENGTH.pack(len(header))], [fd])
        finally:
            if arena is None:
                os.close(fd)  # the receiver got its own descriptor with the message
        sock.sendall(header)
        return
    message.shared = None
    header = _encoder.encode(message)
    parts: list[bytes | memoryview] = [_LENGTH.pack(len(header)), header]
    for view in views:
        parts += [_LENGTH.pack(view.nbytes), view]
    if total < _SHARED_FROM:
        sock.sendall(b"".join(parts))  # one write
        return
    for part in parts:  # large frames where there is no shared memory: not copied once more
        sock.sendall(part)


def recv_message(sock: socket.socket, mapping: SharedMapping | None = None
                 ) -> tuple[WorkerMessage, list[memoryview]]:
    """Read one message and its frames; ``EOFError`` when the peer has gone (closed or died). Shared
    frames are views of ``mapping`` when given (valid until the peer's next message), else of a fresh one."""
    start, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, 1)
    try:
        if not start:
            raise EOFError("the other end of the worker socket closed")
        (size,) = _LENGTH.unpack(bytes(start) + bytes(_recv_exactly(sock, _LENGTH.size - len(start))))
        if size > _MAX_HEADER:
            raise EOFError(f"worker message header of {size} bytes: the peer is not speaking this protocol")
        try:
            message = _decoder.decode(_recv_exactly(sock, size))
        except msgspec.ValidationError as exc:  # pragma: no cover - both ends are this module
            raise EOFError(f"undecodable worker message: {exc}") from exc
        if message.shared is not None:
            if len(fds) != 1 or len(message.shared) != message.n_buffers:
                raise EOFError("a worker message announced shared frames without their memory file")
            if mapping is not None:
                return message, mapping.frames(fds[0], message.shared)
            return message, _map_frames(fds[0], message.shared)
        buffers = []
        for _ in range(message.n_buffers):
            (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
            buffers.append(memoryview(_recv_exactly(sock, length)))
        return message, buffers
    finally:
        for fd in fds:
            os.close(fd)


def _shared_file(views: Sequence[memoryview], total: int) -> int:
    """A memory file holding ``views`` back to back; its descriptor."""
    fd = os.memfd_create("fedlab-frames", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        _fill(fd, views, total)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fill(fd: int, views: Sequence[memoryview], total: int) -> None:
    with mmap.mmap(fd, total) as mapped:
        offset = 0
        for view in views:
            mapped[offset:offset + view.nbytes] = view
            offset += view.nbytes


def _map_frames(fd: int, sizes: list[int]) -> list[memoryview]:
    """The frames in the memory file ``fd``, as views of one mapping (kept alive by the views)."""
    total = sum(sizes)
    if total == 0 or os.fstat(fd).st_size < total:
        raise EOFError("a worker message's memory file is smaller than its frames")
    whole = memoryview(mmap.mmap(fd, total, flags=mmap.MAP_SHARED | _POPULATE))  # one fault-in, not one per page
    frames, offset = [], 0
    for size in sizes:
        frames.append(whole[offset:offset + size])
        offset += size
    return frames


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError("the other end of the worker socket closed")
        got += n
    return data
