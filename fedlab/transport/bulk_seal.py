"""Sealed records of the bulk path: AES-256-GCM under keys agreed over the CURVE channel.

CurveZMQ encrypts everything on its socket at 210-280 MB/s per I/O thread; AES-256-GCM with
AES-NI does several GB/s. So large messages travel on a second, plain TCP connection, each
record sealed here, while CURVE keeps carrying liveness, small messages and the session
secrets (see ``bulk_messages``). This module is pure: no sockets, no threads.

A session starts with a 32-byte random secret and a 16-byte random session id, both chosen by
the researcher and sent to the node inside its authenticated CURVE connection. HKDF-SHA256
(salt: the session id; info: the node id) turns them into two keys, one per direction, so a
record can never be reflected back to its sender.

Every record is a 16-byte header in clear and a body, ciphertext followed by GCM's 16-byte
tag::

    magic "FB" | version u8 | kind u8 | body length u32 | counter u64      (big-endian)

- The **nonce** is the direction byte, three zero bytes and the counter: unique per key by
  construction (a nonce derived from a message id could repeat when an id does). Counters start
  at 1 after the hello (0) and grow by exactly one per record in each direction, so a replayed,
  dropped or reordered record is refused before it is decrypted.
- The **associated data** binds each record to its place: protocol label, session id, direction,
  node id, the header itself, and for data records the message id, frame index and offset. A
  record moved to another message, frame, offset, session or node fails its tag.
- A message is a START record (its msg_id, chunk size and frame sizes, sealed) followed by one
  DATA record per chunk of each frame, in order. The receiver knows the exact length of every
  DATA record in advance, checks the declared total against ``max_message_bytes`` before
  allocating anything, and refuses any header that does not match before reading its body.

A :class:`SealError` means the stream can no longer be trusted: the connection is closed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlab.errors import FedlabTransportError
from fedlab.protocol import MAX_FRAMES

__all__ = [
    "CHUNK_BYTES", "DATA", "HEADER_BYTES", "HELLO", "HELLO_BODY_BYTES", "MAX_CHUNK_BYTES", "MIN_CHUNK_BYTES",
    "SECRET_BYTES", "SESSION_ID_BYTES", "START", "TAG_BYTES", "TO_NODE", "TO_RESEARCHER", "WELCOME", "Opener", "Sealer",
    "SealError", "SessionKeys", "check_hello", "hello_session",
]

MAGIC = b"FB"
VERSION = 1
HELLO, WELCOME, START, DATA = 1, 2, 3, 4
TO_NODE, TO_RESEARCHER = 1, 2  # the direction byte: in the nonce, the associated data and the key choice
HEADER = struct.Struct(">2sBBIQ")
HEADER_BYTES = HEADER.size  # 16
TAG_BYTES = 16
SESSION_ID_BYTES = 16
SECRET_BYTES = 32
CHUNK_BYTES = 1 << 20  # a record's plaintext: small enough to stay in cache between sealing and the socket
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 16 << 20  # what one unread record can cost the receiver; far below AES-GCM's per-call limit
HELLO_BODY_BYTES = SESSION_ID_BYTES + TAG_BYTES  # a hello: the session id in clear, and its tag
_START = struct.Struct(">BIQ")  # msg_id length, frame count, chunk size; then the msg_id and the frame sizes
_LABEL = b"fedlab-bulk/1"
MAX_START_BODY = _START.size + 128 + 8 * (MAX_FRAMES + 2) + TAG_BYTES
_KINDS = {HELLO: "hello", WELCOME: "welcome", START: "start", DATA: "data"}


class SealError(FedlabTransportError):
    """A bulk record was refused; ``reason`` is short (for logs and tests), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SessionKeys:
    """One session's id, its node, and the key of each direction (never logged)."""

    session_id: bytes
    node_id: str
    to_node: bytes = field(repr=False)
    to_researcher: bytes = field(repr=False)

    @classmethod
    def derive(cls, secret: bytes, session_id: bytes, node_id: str) -> SessionKeys:
        if len(secret) != SECRET_BYTES or len(session_id) != SESSION_ID_BYTES:
            raise SealError("bad_session", "a bulk session needs a 32-byte secret and a 16-byte session id")
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=session_id,
                   info=b"fedlab bulk keys v1 " + node_id.encode()).derive(secret)
        return cls(session_id, node_id, okm[:32], okm[32:])

    @classmethod
    def new(cls, node_id: str) -> tuple[SessionKeys, bytes]:
        """Fresh keys for ``node_id`` and the secret to send it over CURVE."""
        secret = os.urandom(SECRET_BYTES)
        return cls.derive(secret, os.urandom(SESSION_ID_BYTES), node_id), secret

    def key(self, direction: int) -> bytes:
        return self.to_node if direction == TO_NODE else self.to_researcher


def _nonce(direction: int, counter: int) -> bytes:
    return bytes((direction, 0, 0, 0)) + counter.to_bytes(8, "big")


def _prefix(keys: SessionKeys, direction: int) -> bytes:
    node = keys.node_id.encode()
    return _LABEL + keys.session_id + bytes((direction, len(node))) + node


def _position(msg_id: bytes, frame: int, offset: int) -> bytes:
    return bytes((len(msg_id),)) + msg_id + frame.to_bytes(4, "big") + offset.to_bytes(8, "big")


def _header(kind: int, length: int, counter: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, length, counter)


def _msg_id_bytes(msg_id: str) -> bytes:
    raw = msg_id.encode()
    if not 1 <= len(raw) <= 128:
        raise SealError("bad_message", f"a bulk message id must be 1 to 128 bytes, not {len(raw)}")
    return raw


def check_hello(header: bytes | memoryview) -> None:
    """Refuse a first record that is not shaped like a hello, before its body is read."""
    if len(header) != HEADER_BYTES:
        raise SealError("truncated", f"a bulk record header is {HEADER_BYTES} bytes, got {len(header)}")
    magic, version, kind, length, counter = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise SealError("not_bulk", "not a fedlab bulk record (wrong magic or version)")
    if kind != HELLO or length != HELLO_BODY_BYTES or counter != 0:
        raise SealError("no_hello", f"expected a hello first, got a {_KINDS.get(kind, 'junk')} record of "
                        f"{length} bytes")


def hello_session(header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    """The session id a hello names (its tag is checked later, by that session's :class:`Opener`)."""
    check_hello(header)
    if len(body) != HELLO_BODY_BYTES:
        raise SealError("truncated", f"a hello of {len(body)} bytes where {HELLO_BODY_BYTES} were declared")
    return bytes(body[:SESSION_ID_BYTES])


class Sealer:
    """Seals the records of one direction of one session, counting them (one sending thread)."""

    def __init__(self, keys: SessionKeys, direction: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise SealError("bad_chunk", f"chunk size {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        self.keys, self.direction, self.chunk_bytes = keys, direction, chunk_bytes
        self._aead = AESGCM(keys.key(direction))
        self._prefix = _prefix(keys, direction)
        self.counter = 0  # of the last record sealed

    def greeting(self) -> bytes:
        """The hello (node to researcher, carrying the session id in clear) or welcome (back)."""
        if self.direction == TO_RESEARCHER:
            header = _header(HELLO, HELLO_BODY_BYTES, 0)
            return header + self.keys.session_id + self._aead.encrypt(_nonce(self.direction, 0), b"",
                                                                      self._prefix + header)
        header = _header(WELCOME, TAG_BYTES, 0)
        return header + self._aead.encrypt(_nonce(self.direction, 0), b"", self._prefix + header)

    def start(self, msg_id: str, sizes: Sequence[int]) -> bytes:
        raw = _msg_id_bytes(msg_id)
        plain = _START.pack(len(raw), len(sizes), self.chunk_bytes) + raw + struct.pack(f">{len(sizes)}Q", *sizes)
        self.counter += 1
        header = _header(START, len(plain) + TAG_BYTES, self.counter)
        return header + self._aead.encrypt(_nonce(self.direction, self.counter), plain, self._prefix + header)

    def data_into(self, out: memoryview, chunk: Any, msg_id: str, frame: int, offset: int) -> memoryview:
        """Seal ``chunk`` (at ``offset`` of frame ``frame``) into ``out``; the record's view of ``out``."""
        size = len(chunk)
        self.counter += 1
        header = _header(DATA, size + TAG_BYTES, self.counter)
        out[:HEADER_BYTES] = header
        end = HEADER_BYTES + size + TAG_BYTES
        aad = self._prefix + header + _position(_msg_id_bytes(msg_id), frame, offset)
        self._aead.encrypt_into(_nonce(self.direction, self.counter), chunk, aad, out[HEADER_BYTES:end])
        return out[:end]

    def records(self, msg_id: str, frames: Sequence[Any]) -> list[tuple[int, int, int]]:
        """(frame, offset, size) of each DATA record of a message, in order."""
        out = []
        for index, frame in enumerate(frames):
            for offset in range(0, len(frame), self.chunk_bytes):
                out.append((index, offset, min(self.chunk_bytes, len(frame) - offset)))
        return out


@dataclass
class _Incoming:
    msg_id: str
    raw_id: bytes
    chunk_bytes: int
    buffers: list[np.ndarray[Any, Any]]
    frame: int = 0
    offset: int = 0


class Opener:
    """Checks and opens the records of one direction of one session, in stream order.

    Call :meth:`check_header` on each 16-byte header: it says how many body bytes to read (or
    refuses before they are read); then :meth:`open` with that body. A message is returned, as
    (msg_id, read-only buffers), when its last record is open.
    """

    def __init__(self, keys: SessionKeys, direction: int, max_message_bytes: int) -> None:
        self.keys, self.direction, self.max_message_bytes = keys, direction, max_message_bytes
        self._aead = AESGCM(keys.key(direction))
        self._prefix = _prefix(keys, direction)
        self.counter = 0  # of the last record accepted
        self._incoming: _Incoming | None = None
        self._kind = 0
        self._expect = 0

    @property
    def msg_id(self) -> str | None:
        """The message being received, if one has started."""
        return self._incoming.msg_id if self._incoming is not None else None

    def check_header(self, header: bytes | memoryview, *, greeting: bool = False) -> int:
        if len(header) != HEADER_BYTES:
            raise SealError("truncated", f"a bulk record header is {HEADER_BYTES} bytes, got {len(header)}")
        magic, version, kind, length, counter = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise SealError("not_bulk", "not a fedlab bulk record (wrong magic or version)")
        if greeting:
            wanted = HELLO if self.direction == TO_RESEARCHER else WELCOME
            size = HELLO_BODY_BYTES if wanted == HELLO else TAG_BYTES
            if kind != wanted or length != size or counter != 0:
                raise SealError("no_hello", f"expected a {_KINDS[wanted]} first, got a {_KINDS.get(kind, 'junk')} "
                                f"record of {length} bytes")
        else:
            if counter != self.counter + 1:
                raise SealError("replay", f"record counter {counter} where {self.counter + 1} was next: a replayed, "
                                "dropped or reordered record")
            if self._incoming is None:
                if kind != START:
                    raise SealError("unexpected", f"a {_KINDS.get(kind, 'junk')} record where a message must start")
                if not _START.size + 1 + TAG_BYTES <= length <= MAX_START_BODY:
                    raise SealError("too_large", f"a message start of {length} bytes (at most {MAX_START_BODY})")
            else:
                size = min(self._incoming.chunk_bytes, len(self._incoming.buffers[self._incoming.frame])
                           - self._incoming.offset)
                if kind != DATA or length != size + TAG_BYTES:
                    raise SealError("unexpected", f"a {_KINDS.get(kind, 'junk')} record of {length} bytes where "
                                    f"{size + TAG_BYTES} bytes of message {self._incoming.msg_id} were next")
        self._kind, self._expect = kind, length
        self._header = bytes(header)
        return int(length)

    def open_greeting(self, body: bytes | memoryview) -> None:
        """Verify the hello or welcome whose header was checked (the session id was looked up already)."""
        self._check_length(body)
        tag = body[-TAG_BYTES:]
        if self._kind == HELLO and bytes(body[:SESSION_ID_BYTES]) != self.keys.session_id:
            raise SealError("bad_session", "a hello for another session")
        self._decrypt(_nonce(self.direction, 0), tag, self._prefix + self._header)

    def open(self, body: bytes | memoryview) -> tuple[str, list[memoryview]] | None:
        self._check_length(body)
        counter = self.counter + 1
        if self._incoming is None:
            plain = self._decrypt(_nonce(self.direction, counter), body, self._prefix + self._header)
            self.counter = counter
            self._begin(plain)
        else:
            inc = self._incoming
            size = self._expect - TAG_BYTES
            dest = inc.buffers[inc.frame].data[inc.offset:inc.offset + size]
            aad = self._prefix + self._header + _position(inc.raw_id, inc.frame, inc.offset)
            try:
                self._aead.decrypt_into(_nonce(self.direction, counter), body, aad, dest)
            except InvalidTag:
                raise self._bad_tag() from None
            self.counter = counter
            inc.offset += size
        return self._advance()

    def _check_length(self, body: bytes | memoryview) -> None:
        if len(body) != self._expect:
            raise SealError("truncated", f"a bulk record body of {len(body)} bytes where {self._expect} were declared")

    def _decrypt(self, nonce: bytes, body: Any, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise self._bad_tag() from None

    def _bad_tag(self) -> SealError:
        return SealError("bad_tag", "a bulk record failed authentication: it was altered, moved, or sealed with "
                         "another key")

    def _begin(self, plain: bytes) -> None:
        id_len, n_frames, chunk = _START.unpack_from(plain)
        sizes_at = _START.size + id_len
        if not 1 <= id_len <= 128 or len(plain) != sizes_at + 8 * n_frames:
            raise SealError("malformed", "a message start whose lengths do not add up")
        if not 2 <= n_frames <= MAX_FRAMES or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise SealError("malformed", f"a message start with {n_frames} frames and chunks of {chunk} bytes")
        raw_id = plain[_START.size:sizes_at]
        sizes = struct.unpack_from(f">{n_frames}Q", plain, sizes_at)
        total = sum(sizes)
        msg_id = raw_id.decode("utf-8", "replace")
        if total > self.max_message_bytes:
            raise SealError("too_large", f"message {msg_id} of {total} bytes exceeds the limit of "
                            f"{self.max_message_bytes} bytes (max_message_bytes)")
        # np.empty: no zero-filling pass; each page is written once, by the decryption
        self._incoming = _Incoming(msg_id, raw_id, chunk, [np.empty(s, dtype=np.uint8) for s in sizes])

    def _advance(self) -> tuple[str, list[memoryview]] | None:
        inc = self._incoming
        assert inc is not None
        while inc.frame < len(inc.buffers) and inc.offset >= len(inc.buffers[inc.frame]):
            inc.frame += 1
            inc.offset = 0
        if inc.frame < len(inc.buffers):
            return None
        self._incoming = None
        return inc.msg_id, [b.data.toreadonly() for b in inc.buffers]
