"""Large buffers between a researcher service and its kernels: memory files lent by reference.

A 100 MB model takes some 200 ms through a local socket on a loaded machine, and one copy into
memory that is already mapped some 20 ms. So the link carries only a :class:`BulkRef` naming
where an envelope's buffers lie in a memory file (``memfd``) of the sender, its *lender*; the
receiver, its *borrower*, opens that file through ``/proc/PID/fd/N`` (the PID it read from the
connection's credentials; Linux lets a process open the files of another process of the same
user), checks the file's name carries the token, keeps it mapped from message to message, and
hands out views of it, which are used in place: no copy on the receiving side.

Reuse without a race: a lender writes a file only when no borrower holds views of it. Each
reference sent counts one use; the borrower tracks one array per message under all the views it
handed out, and when the last of them is gone (the aggregator has folded the reply in, zmq has
sent the frames to the node) it sends a :class:`~fedlab.transport.service_link.Release` and the
use ends. The same buffers sent to many nodes (a round's global model) are copied once while
their file is still in use: identical buffer objects name the same file again. A lender that has
``max_files`` files in use returns None and the caller sends the buffers through the socket.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedlab.transport.service_link import BulkRef

__all__ = ["BULK", "BULK_MIN_BYTES", "Borrower", "Lender"]

log = logging.getLogger("fedlab.service")
BULK = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")  # Linux; elsewhere all goes by socket
BULK_MIN_BYTES = 64 * 1024  # smaller buffers go through the socket: a file costs more than it saves there
_ALIGN = 64
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_PREFIX = "fedlab-link-"
IDLE_SECONDS = 60.0  # a free file unused this long is closed (``trim``): memory is not held between sessions of work


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


class _OwnedFile:
    """One memory file of the lender, its mapping, and who still uses what was last written to it."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.fd = os.memfd_create(_PREFIX + self.token, os.MFD_CLOEXEC)
        self.map: mmap.mmap | None = None
        self.size = 0
        self.seq = 0
        self.uses = 0  # references sent and not yet released
        self.freed_at = time.monotonic()  # when its last use ended
        self.offsets: list[int] = []  # where the last write put its buffers
        self._held: list[Any] = []  # the buffers last written (weak where they can be), to name them again

    def holds(self, views: Sequence[Any]) -> bool:
        if self.uses == 0 or len(views) != len(self._held):
            return False
        return all((h() if isinstance(h, weakref.ref) else h) is v for h, v in zip(self._held, views, strict=True))

    def write(self, views: Sequence[Any]) -> None:
        offsets, end = [], 0
        for view in views:
            end = _aligned(end)
            offsets.append(end)
            end += memoryview(view).nbytes
        if end > self.size:
            os.ftruncate(self.fd, end)
            self.size = end
            self.map = mmap.mmap(self.fd, end)  # the old mapping, if any, ends when dropped
        assert self.map is not None
        whole = np.frombuffer(self.map, np.uint8)
        for view, offset in zip(views, offsets, strict=True):
            data = np.frombuffer(view, np.uint8)
            whole[offset:offset + data.nbytes] = data
        del whole
        self.seq += 1
        self._held = [_hold(v) for v in views]
        self.offsets = offsets

    def ref(self, views: Sequence[Any]) -> BulkRef:
        return BulkRef(self.token, self.fd, self.size, self.seq, list(self.offsets),
                       [memoryview(v).nbytes for v in views])

    def close(self) -> None:
        self._held = []
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # pragma: no cover - views of it are never handed out on this side
                pass
            self.map = None
        os.close(self.fd)


def _hold(view: Any) -> Any:
    try:
        return weakref.ref(view)  # a memoryview: never keep a caller's model alive just to recognise it
    except TypeError:
        return view  # bytes cannot be weakly referenced; they cannot change either


class Lender:
    """The memory files one side writes large buffers into for one peer (thread-safe)."""

    def __init__(self, *, max_files: int = 128) -> None:
        self.max_files = max_files
        self._files: dict[str, _OwnedFile] = {}
        self._lock = threading.Lock()
        self.copied = 0  # bytes written into files (for tests and benchmarks)

    def place(self, views: Sequence[Any]) -> BulkRef | None:
        """Where ``views`` lie in a file of this lender (written there unless the file still holds them
        for a message in flight), or None when every file is in use."""
        with self._lock:
            for f in self._files.values():
                if f.holds(views):
                    f.uses += 1
                    return f.ref(views)
            need = sum(_aligned(memoryview(v).nbytes) for v in views)
            free = [f for f in self._files.values() if f.uses == 0]
            if not free and len(self._files) >= self.max_files:
                return None
            fitting = [f for f in free if f.size >= need]
            f = min(fitting, key=lambda x: x.size) if fitting else (max(free, key=lambda x: x.size) if free
                                                                       else self._new())
            f.write(views)
            self.copied += sum(memoryview(v).nbytes for v in views)
            f.uses = 1
            return f.ref(views)

    def _new(self) -> _OwnedFile:
        f = _OwnedFile()
        self._files[f.token] = f
        return f

    def release(self, token: str, seq: int) -> None:
        """The peer is done with one use of (token, seq). The file is kept for the next messages (as many
        as were in use at once: a round to N nodes needs N) until ``trim`` finds it unused for a while."""
        with self._lock:
            f = self._files.get(token)
            if f is None or f.seq != seq or f.uses == 0:
                return
            f.uses -= 1
            if f.uses == 0:
                f.freed_at = time.monotonic()

    def trim(self, idle_seconds: float = IDLE_SECONDS) -> list[str]:
        """Close the free files unused for ``idle_seconds``; their tokens (the peer should unmap them)."""
        limit = time.monotonic() - idle_seconds
        with self._lock:
            old = [f for f in self._files.values() if f.uses == 0 and f.freed_at < limit]
            for f in old:
                del self._files[f.token]
        for f in old:
            f.close()
        return [f.token for f in old]

    def in_use(self) -> int:
        with self._lock:
            return sum(f.uses > 0 for f in self._files.values())

    def probe(self) -> BulkRef:
        """A small file holding its own token, for the peer to prove it can map this side's files."""
        marker = memoryview(b"fedlab-probe-" + uuid.uuid4().hex.encode())
        ref = self.place([marker])
        assert ref is not None
        return ref

    def close(self) -> None:
        with self._lock:
            files, self._files = list(self._files.values()), {}
        for f in files:
            f.close()


class Borrower:
    """The peer's memory files, as this side maps them (thread-safe).

    ``on_release(token, seq)`` runs once per :meth:`views` call when the last view it returned is
    gone, in whatever thread drops it: it must only queue the release for the socket's thread.
    """

    def __init__(self, pid: int, on_release: Callable[[str, int], None], *, writable: bool = False,
                 keep: int = 128) -> None:
        self.pid = pid
        self.writable = writable
        self.keep = keep
        self._on_release = on_release
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def views(self, ref: BulkRef) -> list[memoryview]:
        """Views of the buffers ``ref`` names; ``ValueError`` when the file cannot be read as announced."""
        if len(ref.offsets) != len(ref.sizes):
            raise ValueError("a bulk reference with unequal offsets and sizes")
        end = max((o + n for o, n in zip(ref.offsets, ref.sizes, strict=True)), default=0)
        if any(o < 0 or n < 0 for o, n in zip(ref.offsets, ref.sizes, strict=True)) or end > ref.size:
            raise ValueError("a bulk reference names buffers outside its file")
        base = np.frombuffer(self._mapping(ref), np.uint8)
        if not self.writable:
            base.flags.writeable = False
        weakref.finalize(base, self._on_release, ref.token, ref.seq)
        return [base[o:o + n].data for o, n in zip(ref.offsets, ref.sizes, strict=True)]

    def check_probe(self, ref: BulkRef) -> bool:
        """Whether the peer's probe file can be mapped and holds what a probe holds (then released)."""
        try:
            (view,) = self.views(ref)
            return bytes(view).startswith(b"fedlab-probe-")
        except (OSError, ValueError) as exc:
            log.info("cannot map the peer's memory files (%s): large buffers go through the socket", exc)
            return False

    def _mapping(self, ref: BulkRef) -> mmap.mmap:
        with self._lock:
            known = self._maps.get(ref.token)
            if known is not None and len(known) >= ref.size:
                self._maps.move_to_end(ref.token)
                return known
            mapped = self._open(ref)
            self._maps[ref.token] = mapped
            self._maps.move_to_end(ref.token)
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)  # unmapped once the last view of it is gone
            return mapped

    def _open(self, ref: BulkRef) -> mmap.mmap:
        path = f"/proc/{self.pid}/fd/{ref.fd}"
        fd = os.open(path, (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
            if not name.startswith(f"/memfd:{_PREFIX}{ref.token}"):
                raise ValueError(f"{path} is not the memory file {ref.token} its peer announced ({name!r})")
            if os.fstat(fd).st_size < ref.size:
                raise ValueError(f"the memory file {ref.token} is smaller than announced")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            return mmap.mmap(fd, ref.size, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
        finally:
            os.close(fd)

    def forget(self, token: str) -> None:
        with self._lock:
            self._maps.pop(token, None)

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
