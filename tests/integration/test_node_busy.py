"""A real node flooded with analytics requests: past ``disclosure.max_concurrent`` it answers
``busy`` at once, every request still gets exactly one reply, and every refusal is audited."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import zmq
from federation import NodeProcess, wait_until

from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.audit import AUDIT_FILE, read_entries, verify
from fedlab.node.config import load_config
from fedlab.node.registry import DatasetRegistry
from fedlab.protocol import Envelope, ErrorReply, Heartbeat, PingReply, PingRequest, decode, encode, make_envelope

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_ROWS = 200_000
N_REQUESTS = 30
COLUMNS = ["a", "b", "c", "d", "e"]


class RawResearcher:
    """A bare ROUTER socket playing the researcher, collecting every reply by its parent id."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.node: bytes | None = None
        self.replies: dict[str, list[Envelope]] = {}

    def poll(self, timeout_ms: int) -> None:
        """Receive whatever arrives within ``timeout_ms`` (heartbeats only teach us the node's identity)."""
        while self.sock.poll(timeout_ms):
            identity, *frames = self.sock.recv_multipart()
            self.node = identity
            env = decode(frames)
            if env.msg_type != "heartbeat" and env.parent_id is not None:
                self.replies.setdefault(env.parent_id, []).append(env)
            timeout_ms = 0

    def send(self, env: Envelope) -> None:
        assert self.node is not None
        self.sock.send_multipart([self.node, *encode(env)])

    def wait(self, msg_ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(m in self.replies for m in msg_ids):
            if time.monotonic() > deadline:
                missing = [m for m in msg_ids if m not in self.replies]
                raise AssertionError(f"no reply to {missing} within {timeout} s")
            self.poll(100)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def big_frame() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    return pd.DataFrame({c: np.round(rng.normal(10 * k, 1 + k, N_ROWS), 3) for k, c in enumerate(COLUMNS)})


def test_a_flood_past_max_concurrent_is_answered_busy_and_audited(tmp_path, address):
    frame = big_frame()
    node = NodeProcess.create(tmp_path, "hospital-a", address, frame=frame, heartbeat=1.0)
    limit = load_config(node.directory).disclosure.max_concurrent
    dataset_id = DatasetRegistry(node.directory / "node.db").list()[0].dataset_id
    raw = RawResearcher(address)
    try:
        node.start()
        wait_until(lambda: raw.poll(100) or raw.node is not None, 60, "the node to dial in")
        # a long researcher heartbeat interval: this raw peer never beats again, and the node must
        # not take the silence for a lost researcher while it works through the flood
        raw.send(make_envelope(Heartbeat(name="raw", interval=600.0), "raw"))
        ping = make_envelope(PingRequest(), "raw", msg_id="ping-before")
        raw.send(ping)
        raw.wait([ping.msg_id], 60)

        ids = [f"fa-{i}" for i in range(N_REQUESTS)]
        for msg_id in ids:  # all at once: nothing is awaited between the sends
            raw.send(make_envelope(FARequest(dataset_id=dataset_id, stats=["count", "mean", "std"],
                                             columns=COLUMNS), "raw", msg_id=msg_id))
        raw.wait(ids, 300)
        after = make_envelope(PingRequest(), "raw", msg_id="ping-after")
        raw.send(after)
        raw.wait([after.msg_id], 60)  # the node still serves; any late duplicate came before this
        assert isinstance(raw.replies[after.msg_id][0].content, PingReply)

        assert all(len(raw.replies[m]) == 1 for m in ids), {m: len(raw.replies[m]) for m in ids}
        replies = {m: raw.replies[m][0].content for m in ids}
        busy = [m for m, c in replies.items() if isinstance(c, ErrorReply)]
        answered = [m for m, c in replies.items() if isinstance(c, FAReply)]
        print(f"{len(answered)} answered, {len(busy)} busy (disclosure.max_concurrent = {limit})")
        assert len(busy) + len(answered) == N_REQUESTS, replies
        assert busy, "no request was answered busy"
        assert len(answered) >= limit  # the first `limit` always find room
        for m in busy:
            error = replies[m]
            assert isinstance(error, ErrorReply) and error.code == "busy" and error.node == node.node_id
            assert f"disclosure.max_concurrent = {limit}" in error.message, error.message
            assert f"already working on {limit} analytics/preprocessing requests" in error.message
        for m in answered:
            reply = replies[m]
            assert isinstance(reply, FAReply) and reply.dataset_id == dataset_id
            for column in COLUMNS:
                partial = reply.numeric[column]
                assert partial.count == N_ROWS
                assert partial.mean == pytest.approx(frame[column].mean(), rel=1e-9)

        audit = node.directory / AUDIT_FILE

        def logged() -> dict[str, list[dict]]:
            found: dict[str, list[dict]] = {}
            for entry in read_entries(audit):
                if entry.get("msg_id") in replies:
                    found.setdefault(entry["msg_id"], []).append(entry)
            return found

        entries = wait_until(lambda: (f := logged()) and len(f) == N_REQUESTS and f, 60,
                             "an audit line for every request")
        assert all(len(lines) == 1 for lines in entries.values())
        for m in busy:
            (line,) = entries[m]
            assert line["msg_type"] == "fa_request" and line["outcome"] == "refused" and line["code"] == "busy"
            assert line["asked"]["dataset_id"] == dataset_id
        assert all(entries[m][0]["outcome"] == "ok" for m in answered)
        assert verify(audit).ok
        assert "answered busy" in node.log() and "Traceback" not in node.log()
    finally:
        node.stop()
        raw.close()


def test_the_cap_counts_queued_and_running_requests_and_frees_them_on_failure(tmp_path, monkeypatch):
    """The same rule on a Node object with a stand-in transport (deterministic: no timing)."""
    import fedlab.node.runtime as runtime
    from fedlab.node.config import init_node_dir

    sent: list[Envelope] = []

    class Transport:  # what Node uses of ZmqNodeTransport, recording what is sent
        on_refused = None

        def __init__(self, *args, **kwargs) -> None:
            pass

        def send(self, envelope: Envelope) -> None:
            sent.append(envelope)

        def close(self) -> None:
            pass

    monkeypatch.setattr(runtime, "ZmqNodeTransport", Transport)
    config = init_node_dir(tmp_path / "site", "site")
    node = runtime.Node(config)
    release = threading.Event()
    handled: list[str] = []

    def handle(envelope: Envelope) -> Envelope:
        release.wait(120)
        handled.append(envelope.msg_id)
        if envelope.msg_id.endswith("boom"):
            raise RuntimeError("a bug after the dispatcher")  # the slot must still be freed
        return make_envelope(PingReply(node_name="site"), config.node_id, parent_id=envelope.msg_id)

    node.dispatcher.handle = handle  # type: ignore[method-assign]
    limit = config.disclosure.max_concurrent
    request = FARequest(dataset_id="d", stats=["count"])
    try:
        for i in range(limit):  # two run, the others wait in the queue: all count
            node._on_message(make_envelope(request, "r", msg_id=f"held-{i}{'-boom' if i % 2 else ''}"))
        node._on_message(make_envelope(PingRequest(), "r", msg_id="ping"))  # not capped
        node._on_message(make_envelope(request, "r", msg_id="over"))
        (busy,) = [e for e in sent if e.parent_id == "over"]  # answered at once, on this thread
        assert isinstance(busy.content, ErrorReply) and busy.content.code == "busy"
        assert "over" not in handled
        release.set()
        wait_until(lambda: node._in_flight == 0 and len(handled) == limit + 1, 120, "the held requests to finish")
        node._on_message(make_envelope(request, "r", msg_id="after"))
        wait_until(lambda: any(e.parent_id == "after" for e in sent), 120, "room again after the failures")
        assert [e.content.code for e in sent if isinstance(e.content, ErrorReply)] == ["busy"]
    finally:
        node.stop()
    lines = [e for e in read_entries(config.directory / AUDIT_FILE) if e.get("msg_id") == "over"]
    assert [(e["outcome"], e["code"]) for e in lines] == [("refused", "busy")]
