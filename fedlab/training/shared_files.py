"""The memory files a node and its training worker share a round's frames in.

``fedlab.training.worker_wire`` says what the two processes tell each other; this module holds
where the large frames lie while they do: the node's reusable, lendable files (``SharedArena``),
the worker's view of a file lent to it (``LentFile``), a receiver's kept mappings of its peer's
files (``SharedMapping``), and one-off files for a message that has no arena. Each frame of a
lent file starts at an aligned offset, so tensors can be built over it in place. Linux only
(``memfd``); ``SHARED`` says whether it is available.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SHARED", "LentFile", "PeerMapping", "SharedArena", "SharedMapping", "frames_end", "map_frames",
           "new_shared_file"]

SHARED = hasattr(os, "memfd_create")  # Linux; elsewhere every frame goes through the socket
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_ALIGN = 64  # where each frame of a lent file starts: a cache line, aligned for every dtype a tensor reads in place
_KEEP_MAPPINGS = 2  # peer files a receiver keeps mapped: the node's two arenas
_WRITE_CHUNK = 1 << 30  # one os.pwrite writes at most ~2 GiB


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


def frames_end(sizes: Sequence[int], offsets: Sequence[int] | None) -> int:
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
        end = frames_end(sizes, offsets)
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


class PeerMapping:
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

    def __init__(self, fd: int, mapping: PeerMapping | None, start: int) -> None:
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
        self._files: OrderedDict[tuple[int, int], PeerMapping] = OrderedDict()
        self.lent: LentFile | None = None

    def frames(self, fd: int, sizes: list[int], offsets: list[int] | None = None, *,
               keep: bool = True) -> list[memoryview]:
        """The frames in the memory file ``fd``, as views of its kept mapping."""
        return self.mapping(fd, frames_end(sizes, offsets), keep=keep).frames(sizes, offsets)

    def take_lent(self) -> LentFile | None:
        """The file lent with the last message received (then forgotten here: the caller closes it)."""
        lent, self.lent = self.lent, None
        return lent

    def mapping(self, fd: int, end: int, *, keep: bool = True) -> PeerMapping:
        """A mapping of the file ``fd`` covering its first ``end`` bytes: the kept one if it does."""
        stat = os.fstat(fd)
        if end == 0 or stat.st_size < end:
            raise EOFError("a worker message's memory file is smaller than its frames")
        key = (stat.st_dev, stat.st_ino)
        known = self._files.get(key)
        if known is not None and len(known.view) >= end:
            self._files.move_to_end(key)
            return known
        mapping = PeerMapping(fd, stat.st_size)
        if known is not None:
            del self._files[key]
            known.close()
        if keep:
            self._files[key] = mapping
            while len(self._files) > self.keep:
                self._files.popitem(last=False)[1].close()
        return mapping

    def lend(self, fd: int, mapping: PeerMapping | None, start: int) -> None:
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


def new_shared_file(views: Sequence[memoryview], total: int) -> int:
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


def map_frames(fd: int, sizes: list[int], offsets: list[int] | None = None) -> list[memoryview]:
    """The frames in the memory file ``fd``, as views of one mapping (kept alive by the views)."""
    end = frames_end(sizes, offsets)
    if end == 0 or os.fstat(fd).st_size < end:
        raise EOFError("a worker message's memory file is smaller than its frames")
    whole = memoryview(mmap.mmap(fd, end, flags=mmap.MAP_SHARED | _POPULATE))  # one fault-in, not one per page
    return _slices(whole, sizes, offsets)
