"""Requests and policies against the in-memory twin of the transport."""

from __future__ import annotations

import threading
import time

import pytest

from fedlab.protocol import (
    DatasetSearchReply,
    DatasetSearchRequest,
    ErrorReply,
    PingReply,
    PingRequest,
    make_envelope,
)
from fedlab.researcher import (
    DiscardOnTimeout,
    MessagesByNode,
    Requests,
    StopOnDisconnect,
    StopOnError,
    StopOnTimeout,
)
from fedlab.transport import InMemoryResearcherTransport


def pong(node_id):
    def handler(env):
        return make_envelope(PingReply(node_name=node_id, n_buffers=len(env.buffers)), node_id,
                             parent_id=env.msg_id, buffers=env.buffers)
    return handler


def failing(node_id):
    def handler(env):
        return make_envelope(ErrorReply(code="boom", message="it broke", node=node_id), node_id,
                             parent_id=env.msg_id)
    return handler


@pytest.fixture
def net():
    transport = InMemoryResearcherTransport(researcher_id="researcher-test")
    requests = Requests(transport, default_timeout=5.0)
    transport.start(requests.on_message)
    yield transport, requests
    transport.close()


def test_all_nodes_answer(net):
    transport, requests = net
    for n in ("a", "b", "c"):
        transport.add_node(n, n, pong(n))
    with requests.send(PingRequest()) as req:
        assert sorted(req.replies()) == ["a", "b", "c"]
        assert req.errors() == {} and req.missing() == {} and not req.stopped
    assert requests.pending_count() == 0


def test_buffers_reach_every_node(net):
    transport, requests = net
    for n in ("a", "b"):
        transport.add_node(n, n, pong(n))
    req = requests.send(PingRequest(), buffers=[b"12345"]).wait()
    assert {n: [bytes(b) for b in e.buffers] for n, e in req.replies().items()} == {
        "a": [b"12345"], "b": [b"12345"]}


def test_discard_on_timeout_returns_on_time_with_the_others(net):
    transport, requests = net
    transport.add_node("fast", "fast", pong("fast"))
    transport.add_node("slow", "slow", pong("slow"), delay=3.0)
    t0 = time.monotonic()
    req = requests.send(PingRequest(), policies=[DiscardOnTimeout(0.3)]).wait()
    elapsed = time.monotonic() - t0
    assert list(req.replies()) == ["fast"]
    assert req.missing()["slow"].reason == "timeout"
    assert not req.stopped
    assert 0.3 <= elapsed < 0.4 + 0.3  # honoured to well within 0.1 s on an idle machine


def test_stop_on_timeout_stops_and_says_so(net):
    transport, requests = net
    transport.add_node("fast", "fast", pong("fast"))
    transport.add_node("slow", "slow", pong("slow"), delay=3.0)
    req = requests.send(PingRequest(), policies=[StopOnTimeout(0.2)]).wait()
    assert req.stopped and isinstance(req.stopped_by, StopOnTimeout)
    assert list(req.replies()) == ["fast"]
    assert req.missing()["slow"].reason == "timeout"


def test_stop_on_error_stops_at_first_error(net):
    transport, requests = net
    transport.add_node("bad", "bad", failing("bad"))
    transport.add_node("slow", "slow", pong("slow"), delay=3.0)
    t0 = time.monotonic()
    req = requests.send(PingRequest(), policies=[StopOnError(), DiscardOnTimeout(5)]).wait()
    assert time.monotonic() - t0 < 1.0
    assert req.stopped and req.errors()["bad"].code == "boom"
    assert req.missing()["slow"].reason == "stopped"


def test_errors_without_stop_policy_are_collected(net):
    transport, requests = net
    transport.add_node("bad", "bad", failing("bad"))
    transport.add_node("good", "good", pong("good"))
    req = requests.send(PingRequest()).wait()
    assert list(req.errors()) == ["bad"] and list(req.replies()) == ["good"] and not req.stopped


def test_node_disconnecting_is_dropped_without_policy(net):
    transport, requests = net
    transport.add_node("a", "a", pong("a"))
    transport.add_node("dying", "dying", pong("dying"), delay=5.0)
    threading.Timer(0.1, transport.kill, args=("dying",)).start()
    t0 = time.monotonic()
    req = requests.send(PingRequest()).wait()
    assert time.monotonic() - t0 < 1.0
    assert req.missing()["dying"].reason == "disconnected"


def test_stop_on_disconnect_waits_its_grace_then_stops(net):
    transport, requests = net
    transport.add_node("a", "a", pong("a"), delay=5.0)
    transport.add_node("dying", "dying", pong("dying"), delay=5.0)
    threading.Timer(0.1, transport.kill, args=("dying",)).start()
    t0 = time.monotonic()
    req = requests.send(PingRequest(), policies=[StopOnDisconnect(0.3)]).wait()
    elapsed = time.monotonic() - t0
    assert 0.35 <= elapsed < 1.0  # killed at ~0.1 s, then 0.3 s of grace
    assert req.stopped and req.missing()["dying"].reason == "disconnected"
    assert req.missing()["a"].reason == "stopped"


def test_offline_and_unknown_nodes_are_missing_at_once(net):
    transport, requests = net
    transport.add_node("a", "a", pong("a"))
    transport.add_node("off", "off", pong("off"))
    transport.kill("off")
    req = requests.send(PingRequest(), nodes=["a", "off", "ghost"]).wait()
    assert list(req.replies()) == ["a"]
    assert req.missing()["off"].reason == "disconnected"
    assert req.missing()["ghost"].reason == "unknown"


def test_default_timeout_bounds_every_wait():
    transport = InMemoryResearcherTransport()
    requests = Requests(transport, default_timeout=0.2)
    transport.start(requests.on_message)
    transport.add_node("silent", "silent", lambda env: None)
    req = requests.send(PingRequest()).wait()
    assert req.missing()["silent"].reason == "timeout"
    transport.close()


def test_messages_by_node(net):
    transport, requests = net

    def echo_tags(node_id):
        def handler(env):
            return make_envelope(DatasetSearchReply(datasets=[]), node_id, parent_id=env.msg_id)
        return handler

    seen = {}

    def recording(node_id):
        inner = echo_tags(node_id)

        def handler(env):
            seen[node_id] = env.content.tags
            return inner(env)
        return handler

    for n in ("a", "b"):
        transport.add_node(n, n, recording(n))
    msgs = MessagesByNode(a=DatasetSearchRequest(tags=["x"]), b=DatasetSearchRequest(tags=["y"]))
    req = requests.send(msgs).wait()
    assert sorted(req.replies()) == ["a", "b"] and seen == {"a": ["x"], "b": ["y"]}
    with pytest.raises(ValueError, match="no message for nodes"):
        requests.send(msgs, nodes=["a", "c"])


def test_concurrent_requests_never_get_each_others_replies(net):
    transport, requests = net

    def handler(env):
        return make_envelope(PingReply(node_name="n", n_buffers=0), "n", parent_id=env.msg_id,
                             buffers=env.buffers)

    transport.add_node("n", "n", handler, delay=0.01)
    results = {}

    def worker(i):
        payload = f"request-{i}".encode()
        req = requests.send(PingRequest(), buffers=[payload]).wait()
        results[i] = bytes(req.replies()["n"].buffers[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {i: f"request-{i}".encode() for i in range(40)}
    assert requests.pending_count() == 0


def test_late_reply_after_discard_is_ignored(net):
    transport, requests = net
    transport.add_node("slow", "slow", pong("slow"), delay=0.3)
    req = requests.send(PingRequest(), policies=[DiscardOnTimeout(0.05)]).wait()
    time.sleep(0.4)
    assert req.replies() == {} and req.missing()["slow"].reason == "timeout"


@pytest.mark.parametrize("bad", [0, -1])
def test_policy_timeouts_must_be_positive(bad):
    with pytest.raises(ValueError):
        DiscardOnTimeout(bad)
    with pytest.raises(ValueError):
        StopOnTimeout(bad)


def test_oversize_request_is_refused_before_sending():
    from fedlab.errors import FedlabProtocolError

    transport = InMemoryResearcherTransport(max_message_bytes=1000)
    requests = Requests(transport)
    transport.start(requests.on_message)
    transport.add_node("a", "a", pong("a"))
    with pytest.raises(FedlabProtocolError, match="exceeds the limit of 1000 bytes"):
        requests.send(PingRequest(), buffers=[b"x" * 2000])
    transport.close()


def progress_then_pong(node_id, n_events=3):
    """A node that sends ``n_events`` progress events about the request, then its reply."""
    from fedlab.training.messages import TrainProgress

    def handler(env):
        events = [make_envelope(TrainProgress(experiment_id="e", round=1, phase="training", iteration=i,
                                              n_iterations=n_events), node_id, parent_id=env.msg_id)
                  for i in range(1, n_events + 1)]
        return [*events, pong(node_id)(env)]
    return handler


def test_events_reach_the_listener_and_do_not_end_the_request(net):
    transport, requests = net
    transport.add_node("a", "a", progress_then_pong("a"))
    seen = []
    req = requests.send(PingRequest(), on_event=lambda n, e: seen.append((n, e.content.iteration))).wait()
    assert seen == [("a", 1), ("a", 2), ("a", 3)]
    assert isinstance(req.replies()["a"].content, PingReply)


def test_events_without_listener_are_dropped_quietly(net):
    transport, requests = net
    transport.add_node("a", "a", progress_then_pong("a"))
    req = requests.send(PingRequest()).wait()
    assert list(req.replies()) == ["a"] and req.errors() == {}


def test_a_failing_listener_does_not_lose_the_reply(net):
    transport, requests = net
    transport.add_node("a", "a", progress_then_pong("a"))

    def broken(node_id, envelope):
        raise RuntimeError("listener bug")
    req = requests.send(PingRequest(), on_event=broken).wait()
    assert list(req.replies()) == ["a"]


def test_as_completed_yields_replies_in_arrival_order_then_reports_the_rest(net):
    transport, requests = net
    transport.add_node("fast", "fast", pong("fast"))
    transport.add_node("mid", "mid", pong("mid"), delay=0.15)
    transport.add_node("bad", "bad", failing("bad"))
    transport.add_node("slow", "slow", pong("slow"), delay=3.0)
    req = requests.send(PingRequest(), policies=[DiscardOnTimeout(0.5)])
    order = [node_id for node_id, envelope in req.as_completed()]
    assert order == ["fast", "mid"]
    assert list(req.errors()) == ["bad"]
    assert req.missing()["slow"].reason == "timeout"
    assert req.replies() == {}  # each yielded reply was handed over, not kept
    assert set(req.reply_times()) == {"fast", "mid", "bad"}
    assert requests.pending_count() == 0
