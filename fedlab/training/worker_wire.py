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

The memory files themselves are ``fedlab.training.shared_files``; their classes are re-exported
here for the two ends. This module imports neither torch nor anything of the node.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from fedlab.training.messages import NamedArray
from fedlab.training.shared_files import (
    SHARED,
    LentFile,
    PeerMapping,
    SharedArena,
    SharedMapping,
    frames_end,
    map_frames,
    new_shared_file,
)

__all__ = [
    "Cancel",
    "DPGo",
    "DPPlanned",
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
    device: str = "auto"  # the node's device setting (fedlab.training.device), within which use_gpu chooses


class Cancel(_Base, tag="cancel"):
    """Node -> worker: stop round ``job_id`` at its next iteration (ignored once that round is over)."""

    job_id: str = ""


class Ready(_Base, tag="ready"):
    """Worker -> node, once: torch is loaded and warm; the plan import guard is in place."""

    torch_version: str = ""
    threads: int = 0
    seconds: float = 0.0
    cuda_devices: int = 0  # the CUDA GPUs the worker's torch sees


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
    device: str = "cpu"  # where the round trained
    device_note: str = ""  # why, when not where use_gpu asked (fedlab.training.device)


class DPPlanned(_Base, tag="dp_planned"):
    """Worker -> node, in a DP round, before its first training step: how many rows it trains on. The node
    works out the round's cost from that and its own copy of the arguments, checks its budget, and
    answers ``DPGo``; the worker waits for that answer before touching a row."""

    job_id: str = ""
    n_train: int = 0


class DPGo(_Base, tag="dp_go"):
    """Node -> worker: go on with the DP round ``job_id`` (``go``), or stop it (the node says why itself)."""

    job_id: str = ""
    go: bool = False


class Failed(_Base, tag="failed"):
    """Worker -> node: the round failed. ``error`` is the ``fedlab.errors`` class name, ``code`` a
    protocol error's code; ``message`` is written for the researcher."""

    job_id: str = ""
    error: str = "FedlabTrainingError"
    code: str = ""
    message: str = ""


WorkerMessage = RunRound | Cancel | Ready | RoundProgress | RoundDone | Failed | DPPlanned | DPGo
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WorkerMessage)


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
    large = SHARED and total >= _SHARED_FROM
    message.shared = message.offsets = None
    message.lent = message.transient = message.in_lent = False
    fd: int | None = None
    owned = False
    if lend and SHARED:
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
        fd = arena.write(views, total) if arena is not None else new_shared_file(views, total)
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
        used: PeerMapping | None = None
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
                used = mapping.mapping(fds[0], frames_end(message.shared, message.offsets), keep=not message.transient)
                buffers = used.frames(message.shared, message.offsets)
            else:
                buffers = map_frames(fds[0], message.shared, message.offsets)
        else:
            buffers = []
            for _ in range(message.n_buffers):
                (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
                buffers.append(memoryview(_recv_exactly(sock, length)))
        if message.lent and mapping is not None:
            mapping.lend(fds[0], used, frames_end(message.shared, message.offsets) if message.shared is not None else 0)
        return message, buffers
    finally:
        for fd in fds:
            os.close(fd)


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
