"""The envelope every message travels in, and its encoding into ZeroMQ frames.

Modelled on the Jupyter messaging protocol: a header (msg_id, msg_type, sender, protocol
version, time), the parent msg_id for replies, typed content, and raw binary buffers.

Wire form, one multipart message::

    frame 0   header   msgpack map   {msg_id, msg_type, sender, version, time, parent_id}
    frame 1   content  msgpack map   validated against MESSAGE_TYPES[msg_type] on decode
    frame 2.. buffers  raw bytes     arrays and tensors, described by ArraySpec in the content

Decoding checks size, header, version, type and every content field before any handler sees
the message; a failure raises :class:`DecodeError`, which keeps the header when it could be
read so the receiver can address its error reply to the right request. Nothing is unpickled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from fedlab.errors import FedlabProtocolError, FedlabVersionError
from fedlab.protocol.messages import MESSAGE_TYPES, ErrorReply, Message, message_type_of
from fedlab.protocol.version import PROTOCOL_VERSION, compatible

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_FRAMES",
    "DecodeError",
    "Envelope",
    "Header",
    "decode",
    "encode",
    "encode_content",
    "error_reply_for",
    "make_envelope",
    "new_msg_id",
]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# One buffer frame per array or tensor: far more than any model has, far fewer than a flood of
# empty frames would need to cost real memory before the size check could see it.
MAX_FRAMES = 16384
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Buffer = bytes | memoryview


class Header(msgspec.Struct, frozen=True):
    """Who sent what, when, in reply to what. Unknown extra keys are tolerated (minor versions)."""

    msg_id: _Id
    msg_type: _Id
    sender: _Id
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    time: float
    parent_id: _Id | None = None


@dataclass(frozen=True)
class Envelope:
    """One decoded (or to-be-encoded) message."""

    header: Header
    content: Message
    buffers: Sequence[Buffer] = field(default_factory=tuple)

    @property
    def msg_id(self) -> str:
        return self.header.msg_id

    @property
    def msg_type(self) -> str:
        return self.header.msg_type

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def parent_id(self) -> str | None:
        return self.header.parent_id


class DecodeError(FedlabProtocolError):
    """A message failed decoding. ``header`` is set when the header itself was readable."""

    def __init__(
        self, message: str, *, code: str, field: str | None = None, header: Header | None = None
    ) -> None:
        super().__init__(message, code=code, field=field)
        self.header = header


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_content_decoders = {name: msgspec.msgpack.Decoder(cls) for name, cls in MESSAGE_TYPES.items()}


def new_msg_id() -> str:
    return uuid.uuid4().hex


def make_envelope(
    content: Message,
    sender: str,
    *,
    parent_id: str | None = None,
    buffers: Sequence[Buffer] = (),
    msg_id: str | None = None,
) -> Envelope:
    header = Header(
        msg_id=msg_id or new_msg_id(),
        msg_type=message_type_of(content),
        sender=sender,
        version=PROTOCOL_VERSION,
        time=time.time(),
        parent_id=parent_id,
    )
    return Envelope(header, content, tuple(buffers))


def encode_content(content: Message) -> bytes:
    """The content frame alone: encode it once and reuse it for every node (serialize once)."""
    try:
        return _encoder.encode(content)
    except (TypeError, msgspec.EncodeError) as exc:
        raise FedlabProtocolError(
            f"cannot encode a {type(content).__name__}: {exc} (use plain int, float, str, list and dict)",
            code="invalid_field",
        ) from None


def encode(envelope: Envelope, content_frame: bytes | None = None) -> list[Buffer]:
    """Frames for ``envelope``. Buffers are passed through untouched (no copy)."""
    if content_frame is None:
        content_frame = encode_content(envelope.content)
    return [_encoder.encode(envelope.header), content_frame, *envelope.buffers]


def _field_of(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    marker = "at `$."
    if marker in text:
        return text.split(marker, 1)[1].split("`", 1)[0]
    return None


def _describe(exc: Exception) -> str:
    """A decoding failure msgspec does not wrap in its own errors, in words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeError):
        return "a string is not valid UTF-8"
    return f"{type(exc).__name__}: {exc}"


def _decoder_for(msg_type: str) -> msgspec.msgpack.Decoder[Any]:
    decoder = _content_decoders.get(msg_type)
    if decoder is None and msg_type in MESSAGE_TYPES:  # registered after import
        decoder = _content_decoders[msg_type] = msgspec.msgpack.Decoder(MESSAGE_TYPES[msg_type])
    if decoder is None:
        raise KeyError(msg_type)
    return decoder


def decode(frames: Sequence[Buffer], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Validate and decode ``frames``; raise :class:`DecodeError` saying what was wrong.

    A receiver may pass only the first ``MAX_FRAMES + 1`` frames of a message: the rest cannot
    change the verdict, and a flood of empty frames then costs nothing more to refuse.
    """
    if len(frames) < 2:
        raise DecodeError(
            f"expected at least 2 frames (header, content), got {len(frames)}", code="malformed"
        )
    if len(frames) > MAX_FRAMES:
        raise DecodeError(
            f"message of more than {MAX_FRAMES} frames (the limit)", code="too_large")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        try:  # name the request in the refusal when its header is readable
            known: Header | None = _header_decoder.decode(frames[0]) if len(frames[0]) < 4096 else None
        except Exception:  # any failure to read it just means it goes unnamed
            known = None
        raise DecodeError(
            f"message of {size} bytes exceeds the limit of {max_bytes} bytes", code="too_large",
            header=known,
        )
    try:
        header = _header_decoder.decode(frames[0])
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid header: {exc}", code="invalid_field", field=_field_of(exc)) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"unreadable header frame: {exc}", code="malformed") from None
    except Exception as exc:  # msgspec also raises RecursionError (nesting), UnicodeDecodeError (bad utf-8)
        raise DecodeError(f"unreadable header frame: {_describe(exc)}", code="malformed") from None
    if not compatible(header.version):
        raise _version_error(header)
    try:
        decoder = _decoder_for(header.msg_type)
    except KeyError:
        raise DecodeError(
            f"unknown message type {header.msg_type!r}", code="unknown_type", header=header
        ) from None
    try:
        content = decoder.decode(frames[1])
    except msgspec.ValidationError as exc:
        fld = _field_of(exc)
        raise DecodeError(
            f"invalid {header.msg_type} content: {exc}", code="invalid_field", field=fld, header=header
        ) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(
            f"unreadable {header.msg_type} content frame: {exc}", code="malformed", header=header
        ) from None
    except Exception as exc:
        raise DecodeError(
            f"unreadable {header.msg_type} content frame: {_describe(exc)}", code="malformed", header=header
        ) from None
    return Envelope(header, content, tuple(frames[2:]))


class _VersionDecodeError(DecodeError, FedlabVersionError):
    def __init__(self, message: str, header: Header) -> None:
        DecodeError.__init__(self, message, code="protocol_version", header=header)


def _version_error(header: Header) -> DecodeError:
    return _VersionDecodeError(
        f"peer {header.sender!r} speaks fedlab protocol {header.version}, this side speaks "
        f"{PROTOCOL_VERSION}: upgrade the older side so both share major version "
        f"{PROTOCOL_VERSION.split('.')[0]}",
        header,
    )


def error_reply_for(exc: DecodeError, node: str = "") -> tuple[ErrorReply, str | None]:
    """The error reply to send for a message that failed decoding, and its parent msg_id."""
    reply = ErrorReply(code=exc.code, message=str(exc)[:65536], node=node, field=exc.field)
    return reply, exc.header.msg_id if exc.header is not None else None
