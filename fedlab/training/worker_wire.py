"""What a node and its training worker process say to each other, and how it travels.

The node runs training plans in a separate process (``fedlab.training.worker``) so that a
plan that hangs can be killed and a plan never shares the node's memory. The two talk over
one end each of a Unix socket pair. Nothing is pickled, not even between these two local
processes: a message is a msgpack header (one of the structs below, tagged by type) followed
by raw buffer frames, the same layout as on the network (``NamedArray`` specs index the
frames). The header is preceded by its length (8 bytes, little endian).

Small frames (under 64 kB in all) follow the header on the socket, each with its length, in
one write. Larger ones (a model's parameters) go through shared memory instead: an anonymous
memory file (``memfd``) whose descriptor travels with the header (``SCM_RIGHTS``); the
receiver maps it and reads the frames in place. Pushing even 0.4 MB through a socket's buffer
(a few hundred kB) costs two copies and hand-overs between the two processes, each waiting for
the other to be scheduled (milliseconds each on a loaded machine); the memory file costs one
copy and no hand-over, and the kernel frees it when both ends have let go (even if one dies).
The receiver keeps its mappings of the peer's files between messages (``SharedMapping``):
mapping 100 MB afresh costs tens of milliseconds; a sender reuses a file (``SharedArena``),
kept mapped, since filling fresh pages of a memory file costs the kernel several times the copy.

A round moves its model once each way through memory both processes see, in files the node
owns and *lends* with the round (``send_message(..., lend=True)``):

* in: the node copies the received frames into one of its arenas, each frame at an aligned
  offset (the only copy of the round's parameters); the worker maps the file and the model's
  tensors are built over those very bytes (``fedlab.training.convert.load_params(adopt=True)``),
  so training updates them in place;
* out: the worker's reply names, for each large frame, where it is in the lent file: a frame
  still in place (the trained parameters) costs nothing, any other (auxiliary variables, an
  entry the plan replaced) is written once past the round's frames (``LentFile``); the node
  reads the frames as views of its own mapping and hands them to the network as they are.

An arena whose frames the network still holds (a reply queued in zmq, sent without a copy) is
``busy`` and is not written again until they are all gone: the node keeps two arenas and uses
whichever is free, and when neither is, a third for that round alone (``transient``). A worker
is done with a round's frames once it has replied (the model is dropped), and the node writes
an arena only when it starts a round, so the two never write one file at the same time.

This module imports neither torch nor anything of the node.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from fedlab.training.messages import NamedArray

__all__ = [
    "Cancel",
    "Failed",
    "LentFile",
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
_ALIGN = 64  # where each frame of a lent file starts: a cache line, aligned for every dtype a tensor reads in place
_KEEP_MAPPINGS = 2  # peer files a receiver keeps mapped: the node's two arenas
_WRITE_CHUNK = 1 << 30  # one os.pwrite writes at most ~2 GiB


class _Base(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    n_buffers: int = 0
    shared: list[int] | None = None  # frame sizes, when the frames are in a shared memory file
    offsets: list[int] | None = None  # where each shared frame starts in it (None: back to back from 0)
    lent: bool = False  # the sender's arena comes with this message, lent for the reply (see ``SharedArena``)
    transient: bool = False  # that arena serves this message only: not worth keeping mapped
    in_lent: bool = False  # the shared frames are in the file the receiver lent with its request; none comes along


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


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Aligned offsets for frames of ``sizes`` placed one after the other, and where the last ends."""
    offsets, end = [], 0
    for size in sizes:
        start = _aligned(end)
        offsets.append(start)
        end = start + size
    return offsets, end


def _end(sizes: Sequence[int], offsets: Sequence[int] | None) -> int:
    """Where the frames end in their file; ``EOFError`` for a layout no peer of this module writes."""
    if offsets is None:
        if any(size < 0 for size in sizes):
            raise EOFError("a worker message announced a frame of negative size")
        return sum(sizes)
    if len(offsets) != len(sizes) or any(o < 0 or n < 0 for o, n in zip(offsets, sizes, strict=True)):
        raise EOFError("a worker message announced shared frames at impossible offsets")
    return max((o + n for o, n in zip(offsets, sizes, strict=True)), default=0)


def _slices(view: memoryview | np.ndarray, sizes: Sequence[int], offsets: Sequence[int] | None) -> list[memoryview]:
    if offsets is None:
        offsets, start = [], 0
        for size in sizes:
            offsets.append(start)
            start += size
    if isinstance(view, np.ndarray):
        return [view[o:o + n].data for o, n in zip(offsets, sizes, strict=True)]
    return [view[o:o + n] for o, n in zip(offsets, sizes, strict=True)]


def _address(buffer: Any) -> int:
    """Where ``buffer``'s bytes start in this process's memory."""
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


class SharedArena:
    """A memory file and its sender's mapping of it, kept and reused for the large frames of successive messages.

    Two uses. ``write`` (``send_message``'s ``arena``): the frames back to back, for a receiver
    that is done with (or has copied) a message's frames before the sender writes its next one.
    Lent (``send_message(..., lend=True)``, the node's rounds): ``put`` places the frames at
    aligned offsets and the file goes along with the message; the receiver works on them in place
    and puts its reply's large frames in the same file (``LentFile``), which the sender reads back
    with ``frames``, as views of its own mapping. ``busy`` says whether a view ``frames`` handed out
    is still alive anywhere (a reply queued in zmq): until then the file must not be written.
    ``kept`` is False for an arena used for one message only (its receiver does not keep it mapped).
    """

    def __init__(self, *, kept: bool = True) -> None:
        self.kept = kept
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._handed: list[weakref.ref[np.ndarray]] = []  # the arrays every view handed out is a slice of

    @property
    def fd(self) -> int:
        """The memory file's descriptor (still the arena's), created empty on first use."""
        if self._fd is None:
            self._fd = os.memfd_create("fedlab-frames", os.MFD_CLOEXEC)
        return self._fd

    @property
    def busy(self) -> bool:
        """Whether a frame handed out by ``frames`` is still alive."""
        self._handed = [ref for ref in self._handed if ref() is not None]
        return bool(self._handed)

    def write(self, views: Sequence[memoryview], total: int) -> int:
        """Put ``views`` back to back at the start of the file; its descriptor (still the arena's)."""
        mapped = self._mapped(total)
        offset = 0
        for view in views:
            mapped[offset:offset + view.nbytes] = view
            offset += view.nbytes
        return self.fd

    def put(self, views: Sequence[memoryview]) -> list[int]:
        """Copy ``views`` into the file, each at an aligned offset; the offsets. Never while ``busy``."""
        if self.busy:
            raise RuntimeError("a shared memory arena was about to be overwritten while its frames are still in use")
        offsets, end = _layout([view.nbytes for view in views])
        mapped = self._mapped(end)
        for view, offset in zip(views, offsets, strict=True):
            mapped[offset:offset + view.nbytes] = view
        return offsets

    def frames(self, sizes: Sequence[int], offsets: Sequence[int] | None) -> list[memoryview]:
        """The frames the receiver of the lent file left in it, as views of this side's mapping (no copy);
        ``busy`` until they are all gone. ``EOFError`` for frames outside the file."""
        end = _end(sizes, offsets)
        if end > os.fstat(self.fd).st_size:
            raise EOFError("a worker message announced frames past the end of the memory file it was lent")
        if end == 0:
            return [memoryview(b"") for _ in sizes]
        base = np.frombuffer(self._mapped(end), np.uint8)
        self._handed.append(weakref.ref(base))
        return _slices(base, sizes, offsets)

    def _mapped(self, size: int) -> mmap.mmap:
        """The mapping, covering at least ``size`` bytes (the file grown to that if shorter)."""
        fd = self.fd
        file_size = os.fstat(fd).st_size
        if file_size < size:
            os.ftruncate(fd, size)
            file_size = size
        if self._map is None or len(self._map) < size:
            if self._map is not None:
                try:
                    self._map.resize(file_size)  # keeps the pages already mapped
                    return self._map
                except (BufferError, OSError, SystemError):  # frames of it still alive (they keep the old
                    pass  # mapping, this side gets a new one), or no mremap here
            self._map = mmap.mmap(fd, file_size)
        return self._map

    def close(self) -> None:
        """Let go of the file; frames still alive keep their mapping (unmapped when they go)."""
        mapped, self._map = self._map, None
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Mapping:
    """One mapping of a peer's memory file (the whole file as it was when mapped)."""

    def __init__(self, fd: int, size: int) -> None:
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)  # one fault-in, not one per page
        self.view = memoryview(self.map)
        self.address = _address(self.view)

    def frames(self, sizes: Sequence[int], offsets: Sequence[int] | None) -> list[memoryview]:
        return _slices(self.view, sizes, offsets)

    def close(self) -> None:
        try:  # frames still held elsewhere keep the mapping alive until they go
            self.view.release()
            self.map.close()
        except BufferError:
            pass


class LentFile:
    """The receiver's side of a memory file lent with a message: where the reply's large frames go.

    A frame of the reply that lies in the lent message's frames (a parameter trained in place) is
    named where it is, without a copy; any other is written once, past those frames. The sender
    reads them back from its own mapping (``SharedArena.frames``). Holds its own descriptor.
    """

    def __init__(self, fd: int, mapping: _Mapping | None, start: int) -> None:
        self._fd = os.dup(fd)
        self._mapping = mapping
        self.start = start  # where the lent message's frames end
        self.written = 0  # bytes the last ``place`` had to copy (for tests and benchmarks)

    def place(self, views: Sequence[memoryview]) -> list[int]:
        """Offsets of ``views`` in the file, each written there unless already in place."""
        offsets, cursor = [], _aligned(self.start)
        self.written = 0
        for view in views:
            offset = self._in_place(view)
            if offset is None:
                offset, cursor = cursor, _aligned(cursor + view.nbytes)
                self.append(view, offset)
            offsets.append(offset)
        return offsets

    def _in_place(self, view: memoryview) -> int | None:
        if view.nbytes == 0:
            return 0
        if self._mapping is None:
            return None
        offset = _address(view) - self._mapping.address
        return offset if 0 <= offset and offset + view.nbytes <= self.start else None

    def append(self, view: memoryview, offset: int) -> None:
        """Copy ``view`` into the file at ``offset`` (growing it), without mapping that part."""
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self._fd, view[done:done + _WRITE_CHUNK], offset + done)
        self.written += view.nbytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SharedMapping:
    """The receiving side's mappings of the peer's memory files, kept between messages.

    The peer sends the same files (its arenas) with its large messages, as a new descriptor each
    time. Mapping 100 MB again costs the kernel tens of milliseconds every message (the page
    tables filled anew), so a mapping is kept and reused while the file is the same one (same
    device and inode) and the frames fit in it; the last ``keep`` files are kept, not a file the
    sender marked ``transient``. An inode cannot be reused by another file meanwhile: the kept
    mapping keeps the file alive. Frames returned are valid until the peer writes its next message
    to that file (the arena's rule). ``lent`` is the file lent with the last message, if one was.
    """

    def __init__(self, keep: int = _KEEP_MAPPINGS) -> None:
        self.keep = keep
        self._files: OrderedDict[tuple[int, int], _Mapping] = OrderedDict()
        self.lent: LentFile | None = None

    def frames(self, fd: int, sizes: list[int], offsets: list[int] | None = None, *,
               keep: bool = True) -> list[memoryview]:
        """The frames in the memory file ``fd``, as views of its kept mapping."""
        return self.mapping(fd, _end(sizes, offsets), keep=keep).frames(sizes, offsets)

    def take_lent(self) -> LentFile | None:
        """The file lent with the last message received (then forgotten here: the caller closes it)."""
        lent, self.lent = self.lent, None
        return lent

    def mapping(self, fd: int, end: int, *, keep: bool = True) -> _Mapping:
        """A mapping of the file ``fd`` covering its first ``end`` bytes: the kept one if it does."""
        stat = os.fstat(fd)
        if end == 0 or stat.st_size < end:
            raise EOFError("a worker message's memory file is smaller than its frames")
        key = (stat.st_dev, stat.st_ino)
        known = self._files.get(key)
        if known is not None and len(known.view) >= end:
            self._files.move_to_end(key)
            return known
        mapping = _Mapping(fd, stat.st_size)
        if known is not None:
            del self._files[key]
            known.close()
        if keep:
            self._files[key] = mapping
            while len(self._files) > self.keep:
                self._files.popitem(last=False)[1].close()
        return mapping

    def lend(self, fd: int, mapping: _Mapping | None, start: int) -> None:
        """Note the file ``fd`` as lent with the message just read (its frames, if any, end at ``start``
        in ``mapping``)."""
        if self.lent is not None:
            self.lent.close()
        self.lent = LentFile(fd, mapping, start)

    def close(self) -> None:
        """Let go of the mappings (each ends when the last frame handed out of it is gone, too)."""
        while self._files:
            self._files.popitem()[1].close()
        if self.lent is not None:
            self.lent.close()
            self.lent = None


def send_message(sock: socket.socket, message: WorkerMessage, buffers: Sequence[bytes | memoryview] = (),
                 arena: SharedArena | None = None, *, lend: bool = False, into: LentFile | None = None) -> None:
    """Write ``message`` and its frames; ``message.n_buffers`` must equal ``len(buffers)``.

    Large frames go in ``arena`` when given (see ``SharedArena`` for when that is safe), else in a
    fresh memory file. ``lend``: ``arena`` goes along with the message (even when its frames are
    small enough for the socket), lent for the reply. ``into``: the file the peer lent with the
    message this one answers; large frames go there (``LentFile.place``).
    """
    if message.n_buffers != len(buffers):
        raise ValueError(f"message announces {message.n_buffers} buffers, {len(buffers)} given")
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    total = sum(view.nbytes for view in views)
    large = _SHARED and total >= _SHARED_FROM
    message.shared = message.offsets = None
    message.lent = message.transient = message.in_lent = False
    fd: int | None = None
    owned = False
    if lend and _SHARED:
        if arena is None:
            raise ValueError("lending a memory file needs an arena")
        message.lent, message.transient = True, not arena.kept
        if large:
            message.shared, message.offsets = [view.nbytes for view in views], arena.put(views)
        fd = arena.fd
    elif large and into is not None:
        message.shared, message.offsets = [view.nbytes for view in views], into.place(views)
        message.in_lent = True
    elif large:
        message.shared = [view.nbytes for view in views]
        fd = arena.write(views, total) if arena is not None else _shared_file(views, total)
        owned = arena is None
    header = _encoder.encode(message)
    prefix = _LENGTH.pack(len(header))
    if fd is not None:
        try:
            socket.send_fds(sock, [prefix], [fd])
        finally:
            if owned:
                os.close(fd)  # the receiver got its own descriptor with the message
        prefix = b""
    if message.shared is not None or not views:
        sock.sendall(prefix + header)
        return
    parts: list[bytes | memoryview] = [prefix, header]
    for view in views:
        parts += [_LENGTH.pack(view.nbytes), view]
    if total < _SHARED_FROM:
        sock.sendall(b"".join(parts))  # one write
        return
    for part in parts:  # large frames where there is no shared memory: not copied once more
        sock.sendall(part)


def recv_message(sock: socket.socket, mapping: SharedMapping | None = None, lender: SharedArena | None = None
                 ) -> tuple[WorkerMessage, list[memoryview]]:
    """Read one message and its frames; ``EOFError`` when the peer has gone (closed or died).

    Shared frames are views of ``mapping`` when given (valid until the peer's next message to
    that file), else of a fresh mapping; frames the peer left in the file this side lent it are
    views of ``lender`` (that arena). A file lent with the message is ``mapping.lent`` afterwards.
    """
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
        used: _Mapping | None = None
        if len(fds) != (1 if message.lent or (message.shared is not None and not message.in_lent) else 0):
            raise EOFError("a worker message came without the memory file it announced (or with one it did not)")
        if message.shared is not None:
            if len(message.shared) != message.n_buffers:
                raise EOFError("a worker message announced shared frames other than its buffers")
            if message.in_lent:
                if lender is None:
                    raise EOFError("a worker message announced frames in a memory file that was not lent to it")
                buffers = lender.frames(message.shared, message.offsets)
            elif mapping is not None:
                used = mapping.mapping(fds[0], _end(message.shared, message.offsets), keep=not message.transient)
                buffers = used.frames(message.shared, message.offsets)
            else:
                buffers = _map_frames(fds[0], message.shared, message.offsets)
        else:
            buffers = []
            for _ in range(message.n_buffers):
                (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
                buffers.append(memoryview(_recv_exactly(sock, length)))
        if message.lent and mapping is not None:
            mapping.lend(fds[0], used, _end(message.shared, message.offsets) if message.shared is not None else 0)
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


def _map_frames(fd: int, sizes: list[int], offsets: list[int] | None = None) -> list[memoryview]:
    """The frames in the memory file ``fd``, as views of one mapping (kept alive by the views)."""
    end = _end(sizes, offsets)
    if end == 0 or os.fstat(fd).st_size < end:
        raise EOFError("a worker message's memory file is smaller than its frames")
    whole = memoryview(mmap.mmap(fd, end, flags=mmap.MAP_SHARED | _POPULATE))  # one fault-in, not one per page
    return _slices(whole, sizes, offsets)


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
