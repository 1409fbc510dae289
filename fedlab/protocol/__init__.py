"""Pure protocol: typed messages, the envelope, encode/decode and the protocol version.

No sockets and no threads live here; both the node and the researcher agree only through
this package.
"""

from fedlab.protocol.arrays import pack_array, unpack_array
from fedlab.protocol.envelope import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_FRAMES,
    DecodeError,
    Envelope,
    Header,
    decode,
    encode,
    encode_content,
    error_reply_for,
    make_envelope,
    new_msg_id,
)
from fedlab.protocol.messages import *  # noqa: F403
from fedlab.protocol.messages import __all__ as _messages_all
from fedlab.protocol.version import PROTOCOL_VERSION, compatible

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_FRAMES",
    "PROTOCOL_VERSION",
    "DecodeError",
    "Envelope",
    "Header",
    "compatible",
    "decode",
    "encode",
    "encode_content",
    "error_reply_for",
    "make_envelope",
    "new_msg_id",
    "pack_array",
    "unpack_array",
    *_messages_all,
]
