"""Protocol round-trips, validation at the door, size limits and version checks."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlab.errors import FedlabProtocolError, FedlabVersionError
from fedlab.protocol import (
    PROTOCOL_VERSION,
    DatasetInfo,
    DatasetSearchReply,
    DatasetSearchRequest,
    DecodeError,
    ErrorReply,
    Header,
    Heartbeat,
    PingRequest,
    compatible,
    decode,
    encode,
    encode_content,
    error_reply_for,
    make_envelope,
    pack_array,
    unpack_array,
)
from fedlab.protocol.messages import MESSAGE_TYPES, Message, register


def roundtrip(content, **kw):
    return decode(encode(make_envelope(content, "researcher-1", **kw)))


def test_search_request_roundtrip_keeps_header_and_content():
    env = make_envelope(DatasetSearchRequest(tags=["cancer", "csv"]), "researcher-1")
    back = decode(encode(env))
    assert back.content == DatasetSearchRequest(tags=["cancer", "csv"])
    assert back.header == env.header
    assert back.msg_type == "dataset_search_request"
    assert back.header.version == PROTOCOL_VERSION


def test_reply_carries_parent_id():
    back = roundtrip(ErrorReply(code="x", message="y"), parent_id="abc")
    assert back.parent_id == "abc"


def test_dataset_info_roundtrip():
    info = DatasetInfo(dataset_id="dataset-1", name="bc", tags=["a"], data_type="csv", shape=[3, 2],
                       columns=["x", "y"], dtypes={"x": "float64", "y": "int64"}, n_samples=3)
    back = roundtrip(DatasetSearchReply(datasets=[info]))
    assert back.content.datasets == [info]


def test_buffers_are_passed_as_raw_frames():
    payload = b"\x00\x01" * 1000
    back = roundtrip(PingRequest(), buffers=[payload])
    assert [bytes(b) for b in back.buffers] == [payload]


def test_content_is_serialized_once_and_reused():
    content = DatasetSearchRequest(tags=["a"])
    frame = encode_content(content)
    a = encode(make_envelope(content, "r"), frame)
    b = encode(make_envelope(content, "r"), frame)
    assert a[1] is frame and b[1] is frame
    assert decode(a).msg_id != decode(b).msg_id


@pytest.mark.parametrize("frames", [[], [b"only-one"]])
def test_too_few_frames(frames):
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "malformed"


def test_garbage_header():
    with pytest.raises(DecodeError) as info:
        decode([b"\xc1\xc1garbage", b""])
    assert info.value.code == "malformed"
    assert info.value.header is None


def test_header_missing_field_names_it():
    header = msgspec.msgpack.encode({"msg_id": "1", "msg_type": "ping_request", "sender": "r", "time": 1.0})
    with pytest.raises(DecodeError) as info:
        decode([header, msgspec.msgpack.encode({})])
    assert info.value.code == "invalid_field"
    assert "version" in str(info.value)


def test_invalid_content_field_is_named_and_header_kept():
    env = make_envelope(DatasetSearchRequest(tags=["a"]), "r")
    frames = encode(env)
    frames[1] = msgspec.msgpack.encode({"tags": ["ok", 3]})
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.field == "tags[1]"
    assert info.value.header.msg_id == env.msg_id
    reply, parent = error_reply_for(info.value, node="node-1")
    assert parent == env.msg_id and reply.field == "tags[1]" and reply.node == "node-1"


def test_empty_tags_refused():
    frames = encode(make_envelope(DatasetSearchRequest(tags=["a"]), "r"))
    frames[1] = msgspec.msgpack.encode({"tags": []})
    with pytest.raises(DecodeError, match="length >= 1"):
        decode(frames)


def test_unknown_field_refused():
    frames = encode(make_envelope(PingRequest(), "r"))
    frames[1] = msgspec.msgpack.encode({"echo_buffers": True, "surprise": 1})
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "invalid_field"


def test_unknown_message_type():
    header = Header(msg_id="m1", msg_type="launch_missiles", sender="r", version=PROTOCOL_VERSION, time=0.0)
    with pytest.raises(DecodeError) as info:
        decode([msgspec.msgpack.encode(header), msgspec.msgpack.encode({})])
    assert info.value.code == "unknown_type"
    assert info.value.header.msg_id == "m1"


def test_version_mismatch_names_both_versions():
    header = Header(msg_id="m1", msg_type="ping_request", sender="r", version="2.3", time=0.0)
    with pytest.raises(FedlabVersionError) as info:
        decode([msgspec.msgpack.encode(header), msgspec.msgpack.encode({})])
    assert "2.3" in str(info.value) and PROTOCOL_VERSION in str(info.value)
    assert info.value.code == "protocol_version"
    assert isinstance(info.value, DecodeError)


def test_minor_version_is_compatible():
    assert compatible("1.7") and not compatible("2.0") and not compatible("garbage")


def test_oversize_message_refused_before_parsing():
    frames = encode(make_envelope(PingRequest(), "r", buffers=[b"x" * 2000]))
    with pytest.raises(DecodeError) as info:
        decode(frames, max_bytes=1000)
    assert info.value.code == "too_large"


def test_register_new_type_and_refuse_clash():
    class Custom(Message):
        value: int

    register("custom_test_message", Custom)
    assert roundtrip(Custom(value=3)).content == Custom(value=3)
    with pytest.raises(ValueError):
        register("ping_request", Custom)
    del MESSAGE_TYPES["custom_test_message"]


def test_nothing_is_unpickled():
    import pickle

    evil = pickle.dumps(object())
    with pytest.raises(DecodeError):
        decode([evil, evil])


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_never_crash_the_decoder(frames):
    try:
        decode(frames)
    except DecodeError:
        pass


@given(st.text(min_size=1, max_size=50), st.sampled_from(["online", "busy"]))
def test_heartbeat_roundtrip_property(name, state):
    assert roundtrip(Heartbeat(name=name, state=state)).content == Heartbeat(name=name, state=state)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool"])
def test_array_roundtrip(dtype):
    arr = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    spec, buf = pack_array(arr, 0)
    back = roundtrip(PingRequest(), buffers=[buf])
    out = unpack_array(spec, back.buffers)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == arr.dtype and not out.flags.writeable


def test_array_of_objects_refused():
    with pytest.raises(FedlabProtocolError):
        pack_array(np.array([object()]), 0)


def test_array_spec_that_lies_about_size_refused():
    spec, buf = pack_array(np.zeros(10), 0)
    bad = msgspec.structs.replace(spec, shape=[11])
    with pytest.raises(FedlabProtocolError, match="needs 88 bytes"):
        unpack_array(bad, [buf])
    with pytest.raises(FedlabProtocolError, match="buffer 0"):
        unpack_array(spec, [])
    with pytest.raises(FedlabProtocolError, match="not allowed"):
        unpack_array(msgspec.structs.replace(spec, dtype="|O"), [buf])


@pytest.mark.parametrize("array", [np.array(7, dtype=np.int64), np.zeros((0, 3), dtype=np.float32),
                                   np.arange(12.0).reshape(3, 4).T])
def test_arrays_keep_their_exact_shape(array):
    """0-d (BatchNorm's step counter), empty and non-contiguous arrays come back as they went."""
    spec, frame = pack_array(array, 0)
    back = unpack_array(spec, [bytes(frame)])
    assert back.shape == array.shape and back.dtype == array.dtype and np.array_equal(back, array)
