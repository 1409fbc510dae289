"""Decoding input built to break the decoder: each case is a DecodeError, never another exception.

Found by the fuzz test (tests/integration/test_fuzz.py): msgspec raises RecursionError for deep
nesting and UnicodeDecodeError for invalid UTF-8, and either one used to escape ``decode`` and
stop a transport's loop.
"""

from __future__ import annotations

import msgspec
import pytest

import fedlab.analytics.messages  # noqa: F401 - registers fa_request
from fedlab.protocol import MAX_FRAMES, PROTOCOL_VERSION, DecodeError, Heartbeat, decode


def header(msg_type: str = "fa_request", **extra: object) -> bytes:
    return msgspec.msgpack.encode({"msg_id": "m-1", "msg_type": msg_type, "sender": "s",
                                   "version": PROTOCOL_VERSION, "time": 0.0, **extra})


DEEP = b"\x91" * 100_000 + b"\xc0"
ANY_FIELD = b"\x83" + b"".join(msgspec.msgpack.encode(v) for v in ("dataset_id", "d", "stats", ["mean"],
                                                                   "stats_args"))


@pytest.mark.parametrize("frames, code", [
    ([header(), ANY_FIELD + b"\x81\xa1a\x81\xa1b\x81\xa1c" + DEEP], "malformed"),  # deep value in an Any-typed field
    ([header()[:-1] + b"\xa1x" + DEEP, b"\x80"], "malformed"),  # ... in an ignored extra header key
    ([b"\x81\xa1x" + DEEP, b"\x80"], "malformed"),
    ([header("dataset_search_request"), b"\x81\xa4tags\x91\xa3a\xf4b"], "malformed"),  # bad UTF-8 in content
    ([b"\x81\xa6msg_id\xa3\xff\xfe\xfd", b"\x80"], "malformed"),  # bad UTF-8 in the header
    ([header("ping_request"), b"\x80", *[b""] * MAX_FRAMES], "too_large"),  # a flood of empty frames
])
def test_hostile_frames_are_decode_errors(frames, code):
    with pytest.raises(DecodeError) as info:
        decode(frames, max_bytes=10**9)
    assert info.value.code == code


def test_oversize_message_with_a_deeply_nested_header_is_refused_unnamed():
    frames = [b"\x81\xa1x" + b"\x91" * 3000 + b"\xc0", b"\x80"]
    with pytest.raises(DecodeError) as info:
        decode(frames, max_bytes=10)
    assert info.value.code == "too_large" and info.value.header is None


@pytest.mark.parametrize("interval", [float("nan"), float("inf"), 0.0, -1.0, 1e-300, 1e9])
def test_heartbeat_interval_must_be_sensible(interval):
    frames = [header("heartbeat"), msgspec.msgpack.encode({"name": "n", "interval": interval})]
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "invalid_field" and info.value.field == "interval"
    assert decode([frames[0], msgspec.msgpack.encode({"name": "n", "interval": 0.2})]).content == Heartbeat(
        name="n", interval=0.2)
