"""A real node facing a raw ZeroMQ peer that sends garbage: it answers errors and keeps serving."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq
from federation import NodeProcess, breast_cancer_splits

from fedlab.node.config import init_node_dir
from fedlab.protocol import (
    PROTOCOL_VERSION,
    DatasetListReply,
    ErrorReply,
    Header,
    PingReply,
    PingRequest,
    decode,
    encode,
    make_envelope,
)

pytestmark = pytest.mark.integration


class RawResearcher:
    """A bare ROUTER socket playing the researcher, to send what a real one never would."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.node: bytes | None = None

    def wait_for_node(self, timeout: float = 30.0) -> bytes:
        frames = self.recv(timeout, lambda env: True)
        return frames

    def recv(self, timeout: float, want) -> object:
        """The next decoded envelope satisfying ``want`` (heartbeats are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                identity, *frames = self.sock.recv_multipart()
                self.node = identity
                env = decode(frames)
                if env.msg_type != "heartbeat" and want(env):
                    return env
                if env.msg_type == "heartbeat" and want is not None and want(env):
                    return env
        raise AssertionError("no matching message from the node before the deadline")

    def send(self, frames) -> None:
        assert self.node is not None
        self.sock.send_multipart([self.node, *frames])

    def reply_to(self, msg_id: str | None, timeout: float = 5.0):
        return self.recv(timeout, lambda env: env.msg_type != "heartbeat" and env.parent_id == msg_id)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def raw_and_node(tmp_path, address):
    raw = RawResearcher(address)
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=breast_cancer_splits(2)[0]).start()
    raw.wait_for_node()
    yield raw, node
    node.stop()
    raw.close()


def ping_works(raw: RawResearcher) -> None:
    env = make_envelope(PingRequest(), "raw")
    raw.send(encode(env))
    assert isinstance(raw.reply_to(env.msg_id).content, PingReply)


def header(msg_type: str, *, version: str = PROTOCOL_VERSION, msg_id: str = "m-1") -> bytes:
    return msgspec.msgpack.encode(Header(msg_id=msg_id, msg_type=msg_type, sender="raw",
                                         version=version, time=time.time()))


def test_malformed_frames_get_error_replies_and_node_keeps_serving(raw_and_node):
    raw, node = raw_and_node
    for frames in ([b"garbage"], [b"\xc1\xc1", b"\x00"], [b"", b"", b""]):
        raw.send(frames)
        reply = raw.recv(5, lambda env: isinstance(env.content, ErrorReply) and env.parent_id is None)
        assert reply.content.code in {"malformed", "invalid_field"}
        assert reply.content.node == node.node_id
    ping_works(raw)
    assert "refused a message" in node.log()


def test_invalid_field_is_named(raw_and_node):
    raw, _ = raw_and_node
    raw.send([header("dataset_search_request", msg_id="bad-tags"), msgspec.msgpack.encode({"tags": [7]})])
    reply = raw.reply_to("bad-tags")
    assert reply.content.code == "invalid_field" and reply.content.field == "tags[0]"
    ping_works(raw)


def test_unknown_message_type_gets_error_reply(raw_and_node):
    raw, _ = raw_and_node
    raw.send([header("format_disk", msg_id="unknown-1"), msgspec.msgpack.encode({})])
    reply = raw.reply_to("unknown-1")
    assert reply.content.code == "unknown_type" and "format_disk" in reply.content.message
    # a known type the node has no handler for is refused the same way
    raw.send(encode(make_envelope(DatasetListReply(datasets=[]), "raw", msg_id="no-handler")))
    assert raw.reply_to("no-handler").content.code == "unknown_type"
    ping_works(raw)


def test_wrong_protocol_version_names_both_versions(raw_and_node):
    raw, node = raw_and_node
    raw.send([header("ping_request", version="9.0", msg_id="future"), msgspec.msgpack.encode({})])
    reply = raw.reply_to("future")
    assert reply.content.code == "protocol_version"
    assert "9.0" in reply.content.message and PROTOCOL_VERSION in reply.content.message
    ping_works(raw)
    assert "speaks fedlab protocol 9.0" in node.log()


def test_oversize_message_refused(tmp_path, address):
    raw = RawResearcher(address)
    config = init_node_dir(tmp_path / "small", "small", address)
    text = (tmp_path / "small" / "config.toml").read_text().replace(
        f"max_message_bytes = {config.max_message_bytes}", "max_message_bytes = 100000")
    (tmp_path / "small" / "config.toml").write_text(text)
    node = NodeProcess(tmp_path / "small", address).start()
    try:
        raw.wait_for_node()
        env = make_envelope(PingRequest(), "raw", buffers=[b"x" * 60_000, b"y" * 60_000], msg_id="huge")
        raw.send(encode(env))
        reply = raw.reply_to("huge")
        assert reply.content.code == "too_large" and "100000" in reply.content.message
        ping_works(raw)
    finally:
        node.stop()
        raw.close()
